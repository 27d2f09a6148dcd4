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
    """A snapshot of a processor, returned by :meth:`Processor.statistics`.

    Attributes:
        workers: Number of worker tasks.
        keys: Keys that hold state now: pending operations or a batch in flight.
        active_batches: Batches loading, open, or saving now.
        pending_operations: Accepted operations whose outcome is not delivered yet.
        operations_done: Operations whose outcome (value or exception) was delivered.
        batches_done: Batches finished, failed ones included.
        load_failures: Batches whose load raised or timed out.
        save_failures: Batches whose save raised or timed out.
        operation_failures: Operations that raised.
        operations_withdrawn: Operations removed before they were applied,
            because their caller was cancelled.
        stopping: True once the processor began to stop.
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


@dataclass(frozen=True)
class BatchReport:
    """What one finished batch did, passed to the ``on_batch`` hook.

    Times come from the event loop's clock (``anyio.current_time()``), so they are
    virtual under trio's ``MockClock``.

    Attributes:
        key: The batch's key.
        worker: Index of the worker that ran it.
        start: When the batch started (its first operation arrived, or the
            previous batch of the key finished).
        operations: Operations the batch took: applied, raised, or failed by its load.
        load_duration: Seconds spent in load (0.0 without a load function).
        save_duration: Seconds spent in save, or None when nothing was saved.
        error: The :class:`LoadError` or :class:`SaveError` that failed the batch,
            or None.
    """

    key: Hashable
    worker: int
    start: float
    operations: int
    load_duration: float
    save_duration: float | None
    error: BatchError | None
