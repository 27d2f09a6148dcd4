"""docs/semantics.md, points 4 (apply) and 5 (save): at the close the batch's
operations are applied to the loaded resource in call order, within and across
batches; an async operation is refused with a TypeError; the batch saves once
if at least one operation was applied without raising; `run` and
`Pending.result()` give the operation's value once the save finished."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keybatch

from ..helpers import (
    Account,
    Harness,
    Store,
    append,
    cancelled_exc,
    checked_append,
    double_last,
    kt,
    now,
    settle,
    still_works,
)

pytestmark = pytest.mark.anyio


@pytest.mark.timeless
async def test_without_load_the_resource_is_none() -> None:
    seen = []
    async with keybatch.open_processor(min_duration=0) as processor:
        await processor.run("key", seen.append)
    assert seen == [None]


@pytest.mark.timeless
async def test_load_gets_the_key_and_operations_get_what_it_returned() -> None:
    keys = []
    resource = object()

    async def load(key: str) -> object:
        keys.append(key)
        return resource

    async with keybatch.open_processor(load=load, min_duration=0) as processor:
        assert await processor.run("key", lambda r, x, *, y: (r, x, y), 1, y=2) == (
            resource,
            1,
            2,
        )
    assert keys == ["key"]


async def test_the_modified_resource_is_saved_and_the_next_batch_loads_it() -> None:
    store = Store()
    async with store.open() as processor:
        assert await processor.run("a", Account.deposit, 5) == 5
        assert await processor.run("a", Account.deposit, 7) == 12
    assert store.data == {"a": 12}
    assert [key for _, key in store.loads] == ["a", "a"]
    assert store.saves == [(0.1, "a", 5), (0.2, "a", 12)]


@pytest.mark.parametrize(
    ("callers", "min_duration"), [(1000, 0.01), (200, 0)], ids=["0.01", "0"]
)
async def test_concurrent_operations_on_one_key_are_applied_one_by_one(
    callers: int, min_duration: float
) -> None:
    store = Store()
    results: list[int] = []
    reports: list[keybatch.BatchReport] = []

    async def call() -> None:
        results.append(await processor.run("k", Account.deposit, 1))

    async with (
        store.open(min_duration=min_duration, on_batch=reports.append) as processor,
        anyio.create_task_group() as tg,
    ):
        for _ in range(callers):
            tg.start_soon(call)
    assert store.data == {"k": callers}
    assert sorted(results) == list(range(1, callers + 1)), "each saw the ones before"
    assert len(reports) < callers, "operations were batched"
    assert sum(r.operations for r in reports) == callers


async def test_call_order_is_kept_across_batch_boundaries() -> None:
    applied: list[int] = []
    async with keybatch.open_processor(min_duration=0.1, max_ops=3) as processor:
        pendings = [
            processor.submit("k", lambda r, i=i: applied.append(i)) for i in range(10)
        ]
        for p in pendings:
            await p.result()
    assert applied == list(range(10))


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from(["run", "submit", "bad", "double"]),
            st.integers(0, 3),  # virtual milliseconds before the call, x10
        ),
        max_size=30,
    ),
    st.sampled_from([0, 0.01, 0.05]),
    st.sampled_from([None, 2]),
)
async def test_random_interleavings_match_one_by_one(
    calls: list[tuple[str, str, int]], min_duration: float, max_ops: int | None
) -> None:
    h = Harness()
    async with h.open(min_duration=min_duration, max_ops=max_ops) as processor:
        async with anyio.create_task_group() as tg:
            for i, (key, how, wait) in enumerate(calls):
                await anyio.sleep(wait / 100)
                if how == "submit":
                    h.rec.submit(processor, key, append, i)
                elif how == "double":
                    tg.start_soon(h.call, processor, i, key, double_last)
                else:
                    x = -i if how == "bad" else i
                    tg.start_soon(h.call, processor, i, key, checked_append, x)
    await h.check()
    # And against a model: per key, the calls that succeed, one by one, in the
    # order they were made (a task started earlier may call later).
    expected: dict[str, list[int]] = {}
    for event in h.rec.events:
        if event.kind == "call":
            op, args, _, _ = event.data
            state = expected.setdefault(event.key, [])
            if op is not checked_append or args[0] >= 0:
                op(state, *args)
    assert h.store.data == {k: v for k, v in expected.items() if v or k in h.store.data}


# --------------------------------------------------------------------------- refused


async def _async_op(resource: list[Any]) -> None:
    raise AssertionError("never runs")


class _AsyncCallable:
    async def __call__(self, resource: list[Any]) -> None:
        raise AssertionError("never runs")


@pytest.mark.parametrize(
    ("op", "message"),
    [
        (_async_op, "plain function"),
        (functools.partial(_async_op), "plain function"),
        (_AsyncCallable(), "plain function"),
        (42, "callable"),
        (None, "callable"),
    ],
    ids=["async def", "partial", "async __call__", "int", "None"],
)
@pytest.mark.timeless
async def test_async_or_uncallable_operation_is_a_type_error_at_the_call(
    op: Any, message: str
) -> None:
    store = kt.memory_store(lambda key: [])
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=0
    ) as processor:
        with pytest.raises(TypeError, match=message):
            await processor.run("a", op)
        with pytest.raises(TypeError, match=message):
            processor.submit("a", op)
        stats = processor.statistics()
        assert (stats.pending_operations, stats.keys) == (0, 0)
        await still_works(processor, "a")
    assert store.data == {"a": ["ok"], "bystander": ["ok"]}


class _Awaitable:
    def __await__(self) -> Any:
        yield from ()


@pytest.mark.parametrize(
    "make",
    [lambda: _async_op([]), _Awaitable, lambda: asyncio.sleep(0)],
    ids=["coroutine", "__await__", "asyncio.sleep"],
)
async def test_operation_returning_an_awaitable_fails_its_caller_only(
    make: Any,
) -> None:
    def sneaky(resource: list[Any]) -> Any:
        resource.append("sneaky")
        return make()

    store = kt.memory_store(lambda key: [])
    rec = kt.recorder()
    async with keybatch.open_processor(
        load=rec.wrap_load(store.load), save=rec.wrap_save(store.save), min_duration=0.1
    ) as processor:
        results: list[Any] = []

        async def honest() -> None:
            results.append(await rec.run(processor, "a", append, 1))

        async with anyio.create_task_group() as tg:
            tg.start_soon(honest)
            await settle()
            with pytest.raises(TypeError, match="returned an awaitable"):
                await rec.run(processor, "a", sneaky)
        assert results == [1]
        submitted = processor.submit("a", sneaky)  # the same through Pending
        fine = processor.submit("a", append, 2)
        with pytest.raises(TypeError, match="returned an awaitable"):
            await submitted.result()
        assert await fine.result() == 4
        await still_works(processor, "a", rec=rec)
    # No "coroutine was never awaited" warning (warnings are errors here), and
    # the sneaky op's mutation stays: keybatch does not roll back an op that
    # fails, so the batch saves what the op did to the resource before failing.
    assert store.data["a"] == [1, "sneaky", "sneaky", 2, "ok"]
    outcome = [e for e in rec.events if e.kind == "outcome" and e.op == 1]
    assert isinstance(outcome[0].error, TypeError)


# --------------------------------------------------------------------------- save


async def test_batch_where_every_operation_raised_is_not_saved() -> None:
    h = Harness()
    async with h.open() as processor:
        with pytest.raises(ValueError, match="negative"):
            await h.rec.run(processor, "k", checked_append, -1)
        pending = h.rec.submit(processor, "k", checked_append, -2)
        other = h.rec.submit(processor, "k", checked_append, -3)
        with pytest.raises(ValueError, match="negative: -2"):
            await h.rec.result(pending)
        with pytest.raises(ValueError, match="negative: -3"):
            await h.rec.result(other)
    assert (h.store.loads, h.store.saves) == (2, 0)
    assert [(r.operations, r.failed_operations) for r in h.reports] == [(1, 1), (2, 2)]
    assert [r.save_duration for r in h.reports] == [None, None]
    assert processor.statistics().operation_failures == 3
    await h.check()


async def test_submit_then_result_gives_the_value_once_saved() -> None:
    store = Store(save_delay=0.25)
    async with store.open(max_duration=1) as processor:
        pending = processor.submit("k", Account.deposit, 5)
        assert not pending.done()
        assert repr(pending) == "<keybatch.Pending key='k' pending>"
        assert await pending.result() == 5
        assert pending.done()
        assert repr(pending) == "<keybatch.Pending key='k' done>"
        assert now() == 0.35  # the window, then the save
        assert store.saves == [(0.35, "k", 5)]
        assert await pending.result() == 5  # again: the same value
        # and it is still a checkpoint
        with anyio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(cancelled_exc()):
                await pending.result()


async def test_submitted_operations_are_saved_without_anyone_waiting() -> None:
    store = Store()
    async with store.open() as processor:
        for _ in range(3):
            processor.submit("k", Account.deposit, 1)
    assert store.data == {"k": 3}
    assert len(store.saves) == 1
