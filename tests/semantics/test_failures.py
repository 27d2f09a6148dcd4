"""docs/semantics.md, points 7 (failures) and 8 (operation errors): a load
failure reaches every operation of the batch (none applied, one load, each
caller its own LoadError chained to the cause); a save failure reaches every
applied operation (each its own SaveError) and the resource is discarded; an
operation that raises affects only its caller, who gets that exception object,
and the batch saves the others' effects."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import keybatch

from ..helpers import (
    Harness,
    append,
    checked_append,
    double_last,
    list_store,
    opener,
    settle,
    still_works,
)

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("what", ["load", "save"])
async def test_a_failure_reaches_every_caller_as_its_own_instance(what: str) -> None:
    h = Harness()
    rule = h.store.inject(what, nth=1, latency=0.01, error=ConnectionError)
    async with h.open() as processor:
        await settle()  # the workers sleep: the five calls make one batch
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(h.call, processor, i, "k", append, i)
        stats = processor.statistics()
    errors = [h.results[i] for i in range(5)]
    error = keybatch.LoadError if what == "load" else keybatch.SaveError
    assert [type(e) for e in errors] == [error] * 5
    assert len({id(e) for e in errors}) == 5, "each caller has its own instance"
    assert len({id(e.__cause__) for e in errors}) == 1
    assert isinstance(errors[0].__cause__, ConnectionError)
    assert {e.key for e in errors} == {"k"}
    if what == "save":
        assert {e.may_have_landed for e in errors} == {True}
    assert rule.fired == 1
    assert (h.store.loads, h.store.saves) == (1, 1 if what == "save" else 0)
    assert h.batches("k") == [5]
    assert (stats.load_failures, stats.save_failures) == (
        (1, 0) if what == "load" else (0, 1)
    )
    assert stats.operations_done == 5
    assert "k" not in h.store.data
    await h.check()


@pytest.mark.parametrize("what", ["load", "save"])
async def test_a_failed_batch_does_not_poison_the_next_one(what: str) -> None:
    h = Harness()
    h.store.inject(what, nth=1, error=ConnectionError)
    async with h.open() as processor:
        failed = [h.rec.submit(processor, "k", append, i) for i in range(3)]
        error = keybatch.LoadError if what == "load" else keybatch.SaveError
        for pending in failed:
            with pytest.raises(error):
                await h.rec.result(pending)
        # the next batch loads again: the failed batch's effects are gone
        assert await h.rec.run(processor, "k", append, 3) == 1
    assert h.store.data == {"k": [3]}
    assert h.store.loads == 2
    await h.check()


async def test_an_operation_that_raises_fails_only_its_caller() -> None:
    h = Harness()
    async with h.open() as processor:
        async with anyio.create_task_group() as tg:
            for i, x in enumerate([1, -1, 2, -2, 3]):
                tg.start_soon(h.call, processor, i, "k", checked_append, x)
                await settle()  # keep the call order
        assert processor.statistics().operation_failures == 2
    assert [type(h.results[i]).__name__ for i in range(5)] == [
        "int",
        "ValueError",
        "int",
        "ValueError",
        "int",
    ]
    assert [h.results[i] for i in (0, 2, 4)] == [1, 2, 3]
    assert h.store.data == {"k": [1, 2, 3]}
    assert [(r.operations, r.failed_operations) for r in h.reports] == [(5, 2)]
    await h.check()


@pytest.mark.parametrize(
    "make",
    [
        lambda: LookupError("mine"),
        lambda: ZeroDivisionError("bug in op"),
        KeyboardInterrupt,
        SystemExit,
        GeneratorExit,
    ],
    ids=["LookupError", "ZeroDivisionError", "KeyboardInterrupt", "SystemExit",
         "GeneratorExit"],
)  # fmt: skip
async def test_the_caller_gets_the_very_object_its_operation_raised(make: Any) -> None:
    # Decided: an op's BaseException is that op's outcome, like any exception:
    # it is raised in the caller's task (where it propagates as usual, and a
    # KeyboardInterrupt still ends the program), not in the worker; the batch
    # goes on and saves the others' effects.
    raised = make()

    def fatal(resource: list[Any]) -> None:
        raise raised

    h = Harness()
    async with h.open() as processor:
        got: list[Any] = []

        async def victim() -> None:
            with pytest.raises(type(raised)) as info:
                await h.rec.run(processor, "a", fatal)
            assert info.value is raised
            got.append("raised")

        async with anyio.create_task_group() as tg:
            tg.start_soon(h.call, processor, 0, "a", append, 1)
            await settle()
            tg.start_soon(victim)
            await settle()
            tg.start_soon(h.call, processor, 2, "a", append, 2)
        assert got == ["raised"]
        assert (h.results[0], h.results[2]) == (1, 2)
        pending = h.rec.submit(processor, "a", fatal)  # the same through Pending
        with pytest.raises(type(raised)) as info:
            await h.rec.result(pending)
        assert info.value is raised
        assert processor.statistics().operation_failures == 2
        await still_works(processor, "a", rec=h.rec)
    assert h.store.data["a"] == [1, 2, "ok"]
    await h.check()


async def test_an_operation_raising_stop_iteration() -> None:
    # Python turns a StopIteration leaving a coroutine into RuntimeError (PEP
    # 479); the caller gets that, caused by the op's StopIteration.
    raised = StopIteration(5)

    def stop(resource: list[Any]) -> None:
        raise raised

    store = list_store()
    async with opener(store) as processor:
        with pytest.raises(RuntimeError, match="StopIteration") as info:
            await processor.run("a", stop)
        assert info.value.__cause__ is raised
        pending = processor.submit("a", stop)
        with pytest.raises(RuntimeError, match="StopIteration"):
            await pending.result()
        await still_works(processor, "a")
    assert store.data == {"a": ["ok"], "bystander": ["ok"]}


@pytest.mark.parametrize("what", ["load", "save"])
async def test_each_result_call_raises_a_fresh_batch_error(what: str) -> None:
    store = list_store()
    store.inject(what, error=OSError)
    async with opener(store) as processor:
        pending = processor.submit("k", append, 1)
        error = keybatch.LoadError if what == "load" else keybatch.SaveError
        with pytest.raises(error) as first:
            await pending.result()
        with pytest.raises(error) as second:
            await pending.result()
        assert first.value is not second.value
        assert first.value.__cause__ is second.value.__cause__
        assert isinstance(first.value.__cause__, OSError)


@pytest.mark.parametrize(
    ("calls", "keys", "workers", "every", "min_duration", "seed"),
    [(300, 9, 3, 0.003, 0.1, 3), (100, 4, 2, 0.001, 0.001, 5)],
    ids=["300 calls", "100 calls"],
)
async def test_keys_are_independent_under_faults(
    calls: int, keys: int, workers: int, every: float, min_duration: float, seed: int
) -> None:
    h = Harness(seed=seed)
    h.store.inject("both", probability=0.2, error=ConnectionError)
    async with h.open(workers=workers, min_duration=min_duration) as processor:
        async with anyio.create_task_group() as tg:
            for i in range(calls):
                if i % 7 == 0:
                    op, args = double_last, ()
                else:
                    op, args = checked_append, (i if i % 11 else -i,)
                tg.start_soon(h.call, processor, i, f"k{i % keys}", op, *args)
                await anyio.sleep(every)
        with anyio.move_on_after(0.01):  # and a cancelled caller
            await h.rec.run(processor, "k0", append, 99)
    kinds = {type(v).__name__ for v in h.results.values()}
    assert {"int", "ValueError", "LoadError", "SaveError"} <= kinds
    await h.check()
