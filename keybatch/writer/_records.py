"""The writer's records: a report per flush, and a snapshot of the counters."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ["FlushReport", "WriterStatistics"]


@dataclass(frozen=True)
class FlushReport:
    """What one flush did; passed to the `on_flush` hook.

    Attributes:
        key: The key whose buffer was flushed.
        items: Number of items in the flush.
        attempts: Sink calls made (1 + retries).
        start: When the first attempt began (`anyio.current_time()`).
        duration: Seconds from the first attempt to the outcome, backoff included.
        bytes: What the sink returned if it returned an int, else None.
        error: The sink's last exception if the flush failed for good, else None.
    """

    key: Hashable
    items: int
    attempts: int
    start: float
    duration: float
    bytes: int | None
    error: BaseException | None


@dataclass(frozen=True)
class WriterStatistics:
    """A snapshot of a writer, returned by `Writer.statistics()`.

    Attributes:
        items_written: Items the sink accepted.
        flushes: Flushes that succeeded.
        failed_flushes: Flushes that failed for good.
        failed_items: Items that failed for good (their flush failed, or an item
            they waited for was not written); each went to `on_error`.
        retries: Sink calls that were retries.
        buffered: Items accepted and not yet written or failed: waiting in a
            buffer, held for their dependencies, or in a flush.
        held: Of those, items held until the items they wait for are written.
        bytes_written: Sum of the ints the sink returned (0 if it returns None).
        dropped_items: Items lost because the writer was torn down (its block
            raised or was cancelled) before they entered a flush.
    """

    items_written: int
    flushes: int
    failed_flushes: int
    failed_items: int
    retries: int
    buffered: int
    held: int
    bytes_written: int
    dropped_items: int
