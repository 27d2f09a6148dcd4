"""The writer's records: flush reports, counters, per-item results."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FailedItem", "FlushReport", "Partial", "WriteResults", "WriterStatistics"]


@dataclass(frozen=True)
class Partial:
    """What a sink returns when the bulk endpoint accepted part of a batch.

    `failed` maps the index of each rejected item (in the list the sink was
    given) to its exception; every other item counts as written. Failures that
    `retry_on` accepts are retried (only those items, in a later sink call);
    the others are reported at once. A `write_sync` caller gets its own item's
    outcome.

    Attributes:
        failed: Index in the sink's list -> the exception for that item.
        bytes: Bytes sent, as a sink may return (summed in `bytes_written`).

    Example:
        ```python
        async def sink(key, items):
            response = await bulk_insert(key, items)
            return Partial(
                failed={i: RejectedItem(e) for i, e in response.errors.items()}
            )
        ```
    """

    failed: Mapping[int, BaseException] = field(default_factory=dict)
    bytes: int | None = None


@dataclass(frozen=True)
class FlushReport:
    """What one flush did; passed to the `on_flush` hook.

    Attributes:
        key: The key whose buffer was flushed.
        items: Number of items in the flush.
        attempts: Sink calls made (1 + retries).
        start: When the first attempt began (`anyio.current_time()`).
        duration: Seconds from the first attempt to the outcome, backoff included.
        bytes: The sum of what the sink returned as ints (or as
            [`Partial.bytes`][keybatch.writer.Partial]), None if it returned none.
        error: The exception of the last sink call if it raised, else None.
        failed: Items of the flush that were not written (the sink raised for
            good, a [`Partial`][keybatch.writer.Partial] rejected them, or the
            call was cut short).
    """

    key: Hashable
    items: int
    attempts: int
    start: float
    duration: float
    bytes: int | None
    error: BaseException | None
    failed: int = 0


@dataclass(frozen=True)
class WriterStatistics:
    """A snapshot of a writer, returned by
    [`Writer.statistics`][keybatch.writer.Writer.statistics].

    Every accepted item ends up counted once in `items_written`,
    `failed_items`, `dropped_items` or `withdrawn_items`; until then it counts
    in `buffered`.

    Attributes:
        items_written: Items the sink accepted.
        flushes: Flushes whose every item was written.
        failed_flushes: Flushes with at least one item that was not written.
        failed_items: Items that failed for good: the sink raised (retries
            spent), a [`Partial`][keybatch.writer.Partial] result rejected
            them, their sink call was cut short by `close_timeout`, or an item
            they waited for was not written. Each went to `on_error`.
        retries: Sink calls that were retries.
        buffered: Items accepted and not yet written or failed: waiting in a
            buffer, held for their dependencies, or in a flush.
        held: Of those, items held until the items they wait for are written.
        bytes_written: Sum of the ints the sink returned (0 if it returns None).
        dropped_items: Items the writer never gave the sink because it stopped
            first: its block raised or was cancelled, `aclose(flush=False)`, or
            `close_timeout` passed. Each went to `on_error` with a
            [`keybatch.ProcessorStopped`][keybatch.ProcessorStopped].
        withdrawn_items: Items whose `write_sync` was cancelled before their
            flush began (never written, and no failure).
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
    withdrawn_items: int = 0


@dataclass(frozen=True)
class FailedItem:
    """An item that was not written, as
    [`Writer.results`][keybatch.writer.Writer.results] lists it.

    Attributes:
        item: The item itself.
        key: Its key.
        id: Its id (None if it had none).
        error: Why: the sink's exception, the exception a
            [`Partial`][keybatch.writer.Partial] gave it, a
            [`DependencyFailed`][keybatch.writer.DependencyFailed], a
            [`WriteError`][keybatch.writer.WriteError] with `may_have_landed`
            for a call cut short, or a
            [`keybatch.ProcessorStopped`][keybatch.ProcessorStopped] for an
            item dropped when the writer stopped.
        attempts: Sink calls that held it.
    """

    item: Any
    key: Hashable
    id: Hashable
    error: BaseException
    attempts: int


@dataclass(frozen=True)
class WriteResults:
    """The writer's accumulated outcomes, from
    [`Writer.results`][keybatch.writer.Writer.results].

    Attributes:
        failed: The items that were not written, oldest first (at most
            `max_results` of them: the oldest go first).
        succeeded: Items written.
        omitted: Failures left out of `failed` because it was full.
    """

    failed: tuple[FailedItem, ...]
    succeeded: int
    omitted: int
