"""docs/semantics.md, point 12 (backpressure) and the last rule of point 9:
with `max_pending=N` at most N accepted operations are unfinished at once; `run`
waits (cancellably) for room, `submit` raises Overloaded; an operation stops
counting once its outcome is delivered or it is withdrawn; cancelling a wait
for room enqueues nothing; the stop refuses the waiters."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import keybatch

from ..helpers import Harness, append, now, outcome_of, settle

pytestmark = pytest.mark.anyio


async def test_submit_raises_overloaded_at_max_pending() -> None:
    async with keybatch.open_processor(max_pending=2) as processor:
        processor.submit("a", lambda r: None)
        processor.submit("b", lambda r: None)
        with pytest.raises(keybatch.Overloaded, match="max_pending=2"):
            processor.submit("c", lambda r: None)
        assert processor.statistics().pending_operations == 2
        await processor.flush()
        assert now() == 0.0
        processor.submit("c", lambda r: None)  # room again
        assert processor.statistics().pending_operations == 1


async def test_run_waits_for_room_at_max_pending() -> None:
    started: dict[str, float] = {}
    async with keybatch.open_processor(max_pending=2, min_duration=1) as processor:

        async def call(key: str) -> None:
            await processor.run(key, lambda r: started.setdefault(key, now()))

        async with anyio.create_task_group() as tg:
            for key in "abc":
                tg.start_soon(call, key)
                await settle()
            assert processor.statistics().pending_operations == 2
    # c waited for room until a and b finished at 1.0, then had its own window
    assert started == {"a": 1.0, "b": 1.0, "c": 2.0}


@pytest.mark.parametrize("max_pending", [1, 2, 3])
async def test_callers_waiting_for_room_are_admitted_in_call_order(
    max_pending: int,
) -> None:
    h = Harness()
    async with h.open(max_pending=max_pending, min_duration=0.25) as processor:
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(h.call, processor, i, "k", append, i)
                await settle()  # each call made after the one before
            stats = processor.statistics()
            assert stats.pending_operations == max_pending
    assert h.results == {i: i + 1 for i in range(8)}
    assert h.store.data == {"k": list(range(8))}
    await h.check()


async def test_a_withdrawn_operation_makes_room() -> None:
    async with keybatch.open_processor(max_pending=1, min_duration=1) as processor:
        with anyio.move_on_after(0.25):
            await processor.run("a", lambda r: None)
        assert processor.statistics().pending_operations == 0
        processor.submit("b", lambda r: None)  # no Overloaded
        with pytest.raises(keybatch.Overloaded):
            processor.submit("c", lambda r: None)


@pytest.mark.parametrize(
    ("key", "returns_at"),
    [
        ("a", 1.0),  # joins the batch still open (started at 0, closes at 1)
        ("b", 1.25),  # a batch of its own: admitted at 0.25, its own 1 s window
    ],
    ids=["same key", "another key"],
)
async def test_the_room_a_withdrawn_operation_frees_goes_to_the_first_waiter(
    key: str, returns_at: float
) -> None:
    done: dict[str, float] = {}
    scopes: dict[str, anyio.CancelScope] = {}
    async with keybatch.open_processor(max_pending=1, min_duration=1) as processor:

        async def call(name: str, key: str) -> None:
            with anyio.CancelScope() as scopes[name]:
                await processor.run(key, lambda r: None)
                done[name] = now()

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "first", "a")
            await settle()
            tg.start_soon(call, "waiter", key)
            await settle()
            assert processor.statistics().pending_operations == 1
            with pytest.raises(keybatch.Overloaded):  # the room is the waiter's
                processor.submit("c", lambda r: None)
            await anyio.sleep(0.25)
            scopes["first"].cancel()  # withdrawn: its room goes to the waiter
    assert done == {"waiter": returns_at}
    stats = processor.statistics()
    assert (stats.operations_withdrawn, stats.operations_done) == (1, 1)


async def test_cancelling_a_wait_for_room_enqueues_nothing() -> None:
    applied: list[str] = []
    async with keybatch.open_processor(max_pending=1, min_duration=1) as processor:
        async with anyio.create_task_group() as tg:
            tg.start_soon(processor.run, "a", lambda r: applied.append("a"))
            await settle()
            with anyio.move_on_after(0.5):
                await processor.run("b", lambda r: applied.append("b"))
            assert now() == 0.5
            assert processor.statistics().pending_operations == 1
        await processor.run("c", lambda r: applied.append("c"))
        stats = processor.statistics()
    assert applied == ["a", "c"]
    assert (stats.operations_done, stats.operations_withdrawn) == (2, 0)


async def test_the_stop_refuses_callers_waiting_for_room() -> None:
    outcome: list[Any] = []
    async with keybatch.open_processor(max_pending=1, min_duration=1) as processor:
        async with anyio.create_task_group() as tg:
            tg.start_soon(processor.run, "a", lambda r: None)
            await settle()

            async def waiter() -> None:
                outcome.append(await outcome_of(lambda: processor.run("b", id)))

            tg.start_soon(waiter)
            await settle()
            await processor.aclose()
            assert now() == 0.0
    assert len(outcome) == 1
    assert isinstance(outcome[0], keybatch.ProcessorStopped)
    stats = processor.statistics()
    assert (stats.operations_done, stats.pending_operations) == (1, 0)


async def test_a_caller_cancelled_right_after_its_admission_withdraws() -> None:
    """Admitted (room freed, its operation queued), then cancelled before it
    ran again: the operation is withdrawn, never applied, and the room is free.
    The hook runs right after the batch's end admitted the waiter."""
    applied: list[str] = []
    scope = anyio.CancelScope()

    def cancel_the_waiter(report: keybatch.BatchReport) -> None:
        if report.operations == 1 and "second" not in applied:
            scope.cancel()

    async with keybatch.open_processor(
        max_pending=1, min_duration=1.0, on_batch=cancel_the_waiter
    ) as processor:
        processor.submit("k", lambda r: applied.append("first"))
        with scope:
            await processor.run("k", lambda r: applied.append("second"))
        assert scope.cancelled_caught
        assert now() == 1.0  # it waited for room until the first batch ended
        await settle()
        stats = processor.statistics()
        assert (stats.pending_operations, stats.operations_withdrawn) == (0, 1)
        await processor.run("k", lambda r: applied.append("third"))  # room again
    assert applied == ["first", "third"]
