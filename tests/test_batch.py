"""The core's batch semantics, checked by the history checker of keybatch.testing.

Every test records the full history (calls, applications, outcomes, loads,
saves) and ends with ``Recorder.check(..., complete=True)``, which verifies the
guarantees as a whole; the assertions before it pin down the exact shape of the
batches the scenario must produce.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keybatch
from keybatch import testing as kt


def append(resource: list[Any], x: Any) -> int:
    resource.append(x)
    return len(resource)


def checked_append(resource: list[Any], x: int) -> int:
    if x < 0:
        raise ValueError(f"negative: {x}")
    resource.append(x)
    return len(resource)


def double_last(resource: list[Any]) -> int:
    if resource:
        resource[-1] *= 2
    return sum(resource)


class Harness:
    """A recorded store, a recorder, and callers that never raise into the nursery."""

    def __init__(self, **store_options: Any) -> None:
        self.store: kt.MemoryStore[list[Any]] = kt.memory_store(
            lambda key: [], **store_options
        )
        self.rec = kt.recorder()
        self.reports: list[keybatch.BatchReport] = []
        self.results: dict[int, Any] = {}

    def open(self, **options: Any) -> Any:
        options.setdefault("min_duration", 0.1)
        options.setdefault("workers", 2)
        return keybatch.open_processor(
            load=self.rec.wrap_load(self.store.load),
            save=self.rec.wrap_save(self.store.save),
            on_batch=self.reports.append,
            **options,
        )

    async def call(
        self,
        processor: keybatch.Processor[Any],
        tag: int,
        key: str,
        op: Callable[..., Any],
        *args: Any,
    ) -> None:
        try:
            self.results[tag] = await self.rec.run(processor, key, op, *args)
        except (Exception, trio.Cancelled) as exc:
            self.results[tag] = exc
            if isinstance(exc, trio.Cancelled):
                raise

    def batches(self, key: str) -> list[int]:
        return [r.operations for r in self.reports if r.key == key]

    async def check(self) -> None:
        await self.rec.collect()
        self.rec.check(self.store.data, complete=True)


@pytest.mark.trio
async def test_one_load_ops_in_arrival_order_one_save(autojump_clock: Any) -> None:
    h = Harness()
    async with h.open() as processor, trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(h.call, processor, i, "k", append, i)
            await trio.sleep(0.0099)
    assert h.batches("k") == [10]
    assert (h.store.loads, h.store.saves) == (1, 1)
    assert h.store.data == {"k": list(range(10))}
    assert h.results == {i: i + 1 for i in range(10)}
    await h.check()


@pytest.mark.trio
async def test_arrivals_after_close_make_the_next_batch_in_order(
    autojump_clock: Any,
) -> None:
    h = Harness()
    h.store.inject("save", latency=0.03)
    async with h.open() as processor, trio.open_nursery() as nursery:
        for i in range(12):
            nursery.start_soon(h.call, processor, i, "k", append, i)
            await trio.sleep(0.025)
    # [0, 0.1) window, save until 0.13; [0.13, 0.23) window (it takes the two
    # calls queued during the save), save until 0.26; then the last two.
    assert h.batches("k") == [4, 6, 2]
    assert h.store.data == {"k": list(range(12))}
    await h.check()


@pytest.mark.trio
async def test_max_ops_splits_batches_exactly(autojump_clock: Any) -> None:
    h = Harness()
    async with h.open(max_ops=3) as processor:
        pendings = [h.rec.submit(processor, "k", append, i) for i in range(8)]
        with kt.assert_elapsed(0):  # full batches close at once; the last by flush
            await processor.flush()
    assert all(p.done() for p in pendings)
    assert h.batches("k") == [3, 3, 2]
    await h.check()


@pytest.mark.trio
async def test_load_failure_fails_the_whole_batch_each_with_its_own_error(
    autojump_clock: Any,
) -> None:
    h = Harness()
    h.store.inject("load", nth=1, latency=0.01, error=ConnectionError)
    async with h.open() as processor, trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(h.call, processor, i, "k", append, i)
    errors = [h.results[i] for i in range(5)]
    assert all(isinstance(e, keybatch.LoadError) for e in errors)
    assert len({id(e) for e in errors}) == 5
    assert len({id(e.__cause__) for e in errors}) == 1
    assert h.store.loads == 1  # not one load per waiting caller
    await h.check()


@pytest.mark.trio
async def test_save_failure_loses_the_batch_and_the_next_loads_again(
    autojump_clock: Any,
) -> None:
    h = Harness()
    h.store.inject("save", nth=1, error=ConnectionError)
    async with h.open() as processor:
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(h.call, processor, i, "k", append, i)
        assert await h.rec.run(processor, "k", append, 3) == 1
    assert all(isinstance(h.results[i], keybatch.SaveError) for i in range(3))
    assert h.store.data == {"k": [3]}
    await h.check()


@pytest.mark.trio
async def test_raising_op_fails_only_its_caller(autojump_clock: Any) -> None:
    h = Harness()
    async with h.open() as processor, trio.open_nursery() as nursery:
        for i, x in enumerate([1, -1, 2, -2, 3]):
            nursery.start_soon(h.call, processor, i, "k", checked_append, x)
            await trio.testing.wait_all_tasks_blocked()
    assert [type(h.results[i]).__name__ for i in range(5)] == [
        "int",
        "ValueError",
        "int",
        "ValueError",
        "int",
    ]
    assert h.store.data == {"k": [1, 2, 3]}
    await h.check()


@pytest.mark.trio
async def test_batch_where_every_op_raised_is_not_saved(autojump_clock: Any) -> None:
    h = Harness()
    async with h.open() as processor:
        with pytest.raises(ValueError, match="negative"):
            await h.rec.run(processor, "k", checked_append, -1)
    assert (h.store.loads, h.store.saves) == (1, 0)
    await h.check()


@pytest.mark.trio
async def test_cancelled_before_applied_is_withdrawn(autojump_clock: Any) -> None:
    h = Harness()
    async with h.open() as processor, trio.open_nursery() as nursery:
        nursery.start_soon(h.call, processor, 0, "k", append, 0)
        with trio.move_on_after(0.05):
            await h.call(processor, 1, "k", append, 1)
        nursery.start_soon(h.call, processor, 2, "k", append, 2)
    assert isinstance(h.results[1], trio.Cancelled)
    assert h.store.data == {"k": [0, 2]}
    (withdrawn,) = [
        e.op for e in h.rec.events if e.kind == "call" and e.data[1] == (1,)
    ]
    assert not any(e.kind == "apply" and e.op == withdrawn for e in h.rec.events)
    await h.check()


@pytest.mark.trio
async def test_cancelled_after_applied_keeps_the_effect(autojump_clock: Any) -> None:
    h = Harness()
    h.store.inject("save", latency=0.05)
    async with h.open() as processor:
        with trio.move_on_after(0.12):  # the batch closed at 0.1, saves until 0.15
            await h.call(processor, 0, "k", append, 0)
    assert isinstance(h.results[0], trio.Cancelled)
    assert h.store.data == {"k": [0]}
    await h.check()


@pytest.mark.trio
async def test_stop_closes_open_batches_and_saves_what_was_accepted(
    autojump_clock: Any,
) -> None:
    h = Harness()
    h.store.inject("save", keys="a", nth=1, latency=0.05)
    async with h.open(workers=1) as processor:
        h.rec.submit(processor, "a", append, 1)
        await trio.sleep(0.1)  # "a" saving until 0.15
        h.rec.submit(processor, "a", append, 2)  # queued behind the save
        h.rec.submit(processor, "b", append, 3)  # window open
    assert trio.current_time() == pytest.approx(0.15)
    assert h.store.data == {"a": [1, 2], "b": [3]}
    assert processor.statistics().keys == 0
    await h.check()


@pytest.mark.trio
async def test_teardown_fails_unapplied_ops_and_finishes_saves(
    autojump_clock: Any,
) -> None:
    h = Harness()
    h.store.inject("save", keys="a", latency=0.05)
    with trio.move_on_after(0.12):
        async with h.open(workers=1) as processor:
            h.rec.submit(processor, "a", append, 1)
            await trio.sleep(0.1)
            h.rec.submit(processor, "b", append, 2)
            await trio.sleep_forever()
    await h.rec.collect()
    outcomes = {e.op: e for e in h.rec.events if e.kind == "outcome"}
    assert outcomes[0].error is None
    assert isinstance(outcomes[1].error, keybatch.ProcessorStopped)
    assert h.store.data == {"a": [1]}
    await h.check()


@pytest.mark.trio
async def test_flush_waits_for_everything_accepted(autojump_clock: Any) -> None:
    h = Harness()
    async with h.open(min_duration=10) as processor:
        pendings = [h.rec.submit(processor, k, append, 1) for k in "abc"]
        with kt.assert_elapsed(0):
            await processor.flush()
        assert all(p.done() for p in pendings)
    assert h.store.data == {k: [1] for k in "abc"}
    await h.check()


@pytest.mark.trio
async def test_keys_are_independent_under_faults(autojump_clock: Any) -> None:
    h = Harness(seed=3)
    h.store.inject("both", probability=0.2, error=ConnectionError)
    async with h.open(workers=3) as processor, trio.open_nursery() as nursery:
        for i in range(300):
            op = double_last if i % 7 == 0 else append
            args = () if op is double_last else (i,)
            nursery.start_soon(h.call, processor, i, f"k{i % 9}", op, *args)
            await trio.sleep(0.003)
    kinds = {type(v).__name__ for v in h.results.values()}
    assert {"int", "LoadError", "SaveError"} <= kinds
    await h.check()


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
@pytest.mark.trio
async def test_random_interleavings_match_one_by_one(
    autojump_clock: Any,
    calls: list[tuple[str, str, int]],
    min_duration: float,
    max_ops: int | None,
) -> None:
    h = Harness()
    async with h.open(min_duration=min_duration, max_ops=max_ops) as processor:
        async with trio.open_nursery() as nursery:
            for i, (key, how, wait) in enumerate(calls):
                await trio.sleep(wait / 100)
                if how == "submit":
                    h.rec.submit(processor, key, append, i)
                elif how == "double":
                    nursery.start_soon(h.call, processor, i, key, double_last)
                else:
                    x = -i if how == "bad" else i
                    nursery.start_soon(h.call, processor, i, key, checked_append, x)
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


@pytest.mark.trio
async def test_flush_returns_when_every_caller_of_a_batch_withdrew(
    autojump_clock: Any,
) -> None:
    # Found by the chaos test: flush() waited forever on the batch of a key
    # whose callers had all been cancelled before it started.
    h = Harness()
    h.store.inject("load", keys="busy", latency=0.15)
    async with h.open(workers=1) as processor:
        busy = h.rec.submit(processor, "busy", append, 0)
        await trio.testing.wait_all_tasks_blocked()  # the worker is in busy's load
        with trio.CancelScope() as scope:
            scope.cancel()
            await h.call(processor, 1, "gone", append, 1)  # queued, then withdrawn
        with trio.fail_after(10), kt.assert_elapsed(0.15):
            await processor.flush()
        assert busy.done()
    assert "gone" not in h.store.data
    await h.check()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
async def test_batches_under_faults_on_asyncio() -> None:
    import anyio

    h = Harness(seed=5)
    h.store.inject("both", probability=0.2, error=ConnectionError)
    async with h.open(min_duration=0.001, workers=2) as processor:
        async with anyio.create_task_group() as tg:
            for i in range(60):
                op = double_last if i % 5 == 0 else checked_append
                args = () if op is double_last else (i if i % 7 else -i,)
                tg.start_soon(h.call, processor, i, f"k{i % 4}", op, *args)
                if i % 10 == 0:
                    await anyio.sleep(0.001)
        with anyio.move_on_after(0.0001):  # a cancelled caller, on asyncio
            await h.rec.run(processor, "k0", append, 99)
    kinds = {type(v).__name__ for v in h.results.values()}
    assert {"int", "ValueError"} <= kinds
    await h.check()
