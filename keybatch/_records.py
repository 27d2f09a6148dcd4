"""Frozen records: processor statistics and batch reports.

No `from __future__ import annotations` here: the annotations stay real objects,
so typing.get_type_hints() works on the public records (they claim to live in
`keybatch`, where their annotation names would not resolve).
"""

from collections.abc import Hashable
from dataclasses import dataclass

from ._errors import BatchError

__all__ = ["BatchReport", "ProcessorStatistics"]


@dataclass(frozen=True)
class ProcessorStatistics:
    """A snapshot of a processor, from [`statistics()`][keybatch.Processor.statistics].

    Attributes:
        workers: Number of worker tasks.
        keys: Keys that hold state now: pending operations, a batch in flight,
            or an exclusive section holding or awaiting them.
        active_batches: Batches loading, open, or saving now.
        pending_operations: Accepted operations whose outcome is not delivered yet.
        operations_done: Operations whose outcome (value or exception) was delivered.
        batches_done: Batches finished, failed ones included (not the ones a
            teardown failed before they ran).
        load_failures: Batches whose load raised or timed out.
        save_failures: Batches whose save raised or timed out.
        operation_failures: Operations that raised.
        operations_withdrawn: Operations removed before they were applied,
            because their caller was cancelled.
        stopping: True once the processor began to stop.
        max_worker_queue: Operations accepted and not yet applied on the busiest
            worker: the main operating signal of a fixed pool.
        conflicts: Saves that raised [`Conflict`][keybatch.Conflict] (each led to
            a replay, or to the batch's failure past `max_replays`).
        exclusive_sections: [`exclusive`][keybatch.Processor.exclusive] sections
            holding their keys now.
    """

    workers: int
    keys: int
    active_batches: int
    pending_operations: int
    operations_done: int
    batches_done: int
    load_failures: int
    save_failures: int
    operation_failures: int
    operations_withdrawn: int
    stopping: bool
    max_worker_queue: int = 0
    conflicts: int = 0
    exclusive_sections: int = 0


@dataclass(frozen=True)
class BatchReport:
    """What one finished batch did, passed to the `on_batch` hook.

    Times come from the event loop's clock (`anyio.current_time()`), so they are
    virtual under trio's `MockClock`.

    Attributes:
        key: The batch's key.
        worker: Index of the worker that ran it.
        start: When the batch started: its first operation arrived, or the
            previous batch of the key finished, or an exclusive section
            released the key. Loop clock.
        operations: Operations the batch took: applied, raised, or failed by its load.
        load_duration: Seconds spent in load (0.0 without a load function).
        save_duration: Seconds spent in save, or None when nothing was saved.
        error: The [`LoadError`][keybatch.LoadError] or
            [`SaveError`][keybatch.SaveError] that failed the batch, or None.
        close_reason: Why the window closed: `"window"` (min_duration passed,
            or every caller withdrew),
            `"max_ops"`, `"flush"` or `"stop"`; None when the batch's first
            load failed (a failed reload during a replay keeps the reason).
        duration: Seconds from the start to the delivery of the outcomes.
        failed_operations: Operations that raised (their callers got their
            exceptions; the batch went on).
        withdrawn_operations: Operations withdrawn by cancelled callers before
            they were applied.
        wall_start: `time.time()` at the start, beside the loop clock's `start`
            (for spans and logs that need wall-clock time).
        replays: Times the batch loaded and applied again after `save` raised
            [`Conflict`][keybatch.Conflict].
    """

    key: Hashable
    worker: int
    start: float
    operations: int
    load_duration: float
    save_duration: float | None
    error: BatchError | None
    close_reason: str | None = None
    duration: float = 0.0
    failed_operations: int = 0
    withdrawn_operations: int = 0
    wall_start: float = 0.0
    replays: int = 0
