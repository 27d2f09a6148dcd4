"""The writer: buffers items per key and flushes them through a processor."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar, final

import anyio

import keybatch
from keybatch._util import NoPublicConstructor

from ._buffer import Buffer, Entry, append, append_sync
from ._deps import TORN_DOWN, Dependencies, dependency_message
from ._errors import DependencyFailed, WriteError
from ._records import FlushReport, WriterStatistics
from ._retry import RetryPolicy
from ._room import RoomQueue

__all__ = ["Writer"]

T = TypeVar("T")

logger = logging.getLogger("keybatch.writer")

_checkpoint = anyio.lowlevel.checkpoint


@final
class Writer(Generic[T], metaclass=NoPublicConstructor):
    """Buffers items per key and flushes them to the sink; built by `open_writer`.

    `T` is the type of the items.
    """

    __slots__ = (
        "_proc",
        "_sink",
        "_interval",
        "_max_buffered",
        "_retry",
        "_on_error",
        "_on_flush",
        "_closing",
        "_room",
        "_buffered",
        "_deps",
        "_written",
        "_flushes",
        "_failed_flushes",
        "_failed_items",
        "_retries",
        "_bytes",
        "_dropped",
        "_gone",
    )

    def __init__(
        self,
        sink: Callable[[Any, list[T]], Awaitable[object]],
        interval: float,
        max_buffered: int,
        retry: RetryPolicy,
        on_error: Callable[[Any, list[T], BaseException], object] | None,
        on_flush: Callable[[FlushReport], object] | None,
    ) -> None:
        self._proc: keybatch.Processor[Buffer] = None  # type: ignore[assignment]
        self._sink = sink
        self._interval = interval
        self._max_buffered = max_buffered
        self._retry = retry
        self._on_error = on_error
        self._on_flush = on_flush
        self._closing = False
        self._room = RoomQueue()
        self._buffered = 0
        self._deps = Dependencies(self)
        self._written = 0
        self._flushes = 0
        self._failed_flushes = 0
        self._failed_items = 0
        self._retries = 0
        self._bytes = 0
        self._dropped = 0
        self._gone = False

    def __repr__(self) -> str:
        state = "closing" if self._closing else "open"
        return f"<keybatch.writer.Writer {state} buffered={self._buffered}>"

    @property
    def flush_interval(self) -> float:
        """Seconds a key's buffer waits after its first item: `flush_interval`
        plus the jitter drawn when the writer was opened."""
        return self._interval

    # ------------------------------------------------------------------ writing

    async def write(
        self,
        item: T,
        *,
        key: Hashable = None,
        id: Hashable = None,
        after: Iterable[Hashable] = (),
    ) -> None:
        """Buffer `item` for `key`; return without waiting for the flush.

        Args:
            item: What to write; the sink gets it in a list with its batch.
            key: Selects the buffer (a collection, a database, a tenant).
                Any hashable; default None, one buffer.
            id: Names the item so that later items can wait for it. Any hashable
                but None; unique among the items not written yet.
            after: ids of items this one must be written after. It is held
                until each of them was flushed successfully; if one of them
                fails, this item fails too (`on_error` gets a
                [`DependencyFailed`][keybatch.writer.DependencyFailed]). ids not
                buffered now count as written unless they failed.

        A failure to write the item later goes to `on_error`, not here.

        Raises:
            keybatch.ProcessorStopped: The writer is closing.
            ValueError: `id` is already buffered, or `after` names it.
            TypeError: `key` is not hashable.

        Cancellation: while waiting for room (more than `max_buffered` items
        buffered), cancelling accepts nothing. Otherwise the item is accepted
        at once; cancellation cannot reach it. This is always a checkpoint.
        """
        await _checkpoint()
        while self._closing or self._buffered >= self._max_buffered:
            if self._closing:
                raise keybatch.ProcessorStopped("the writer is closing")
            await self._wait_for_room()
        self._accept(item, key, id, after)

    def write_nowait(
        self,
        item: T,
        *,
        key: Hashable = None,
        id: Hashable = None,
        after: Iterable[Hashable] = (),
    ) -> None:
        """Like `write`, but raise `keybatch.Overloaded` instead of waiting when full.

        See [`write`][keybatch.writer.Writer.write]. Full means `max_buffered`
        items are buffered.

        Raises:
            keybatch.Overloaded: `max_buffered` items are buffered; nothing
                was accepted.
            keybatch.ProcessorStopped, ValueError, TypeError: As for
                [`write`][keybatch.writer.Writer.write].
        """
        if self._closing:
            raise keybatch.ProcessorStopped("the writer is closing")
        if self._buffered >= self._max_buffered:
            raise keybatch.Overloaded(
                f"max_buffered={self._max_buffered} items are buffered"
            )
        self._accept(item, key, id, after)

    def _accept(
        self, item: T, key: Hashable, id: Hashable, after: Iterable[Hashable]
    ) -> None:
        """Buffer an item once there is room (write and write_nowait)."""
        if id is None and not after:  # the hot path
            self._proc.submit(key, append, item)
            self._buffered += 1
        else:
            self._deps.accept(key, item, id, after, False)

    async def write_sync(
        self,
        item: T,
        *,
        key: Hashable = None,
        id: Hashable = None,
        after: Iterable[Hashable] = (),
    ) -> None:
        """Buffer `item` like `write`; return once the flush holding it succeeded.

        Arguments as for [`write`][keybatch.writer.Writer.write].

        Raises:
            WriteError: The flush failed for good (`__cause__` is the sink's
                last exception); `on_error` got the item too.
            DependencyFailed: An item named in `after` was not written.
            keybatch.ProcessorStopped: The writer is closing, or was torn down
                before the item entered a flush.
            ValueError, TypeError: As for [`write`][keybatch.writer.Writer.write].

        Cancellation: before the item entered a flush (waiting for room, for its
        dependencies, or in the buffer) it is withdrawn: never written, and
        items waiting for its `id` fail. Once its flush began, the item is
        written (or fails) as if nobody had cancelled; only the outcome is lost.
        This is always a checkpoint.
        """
        await _checkpoint()
        while self._closing or self._buffered >= self._max_buffered:
            if self._closing:
                raise keybatch.ProcessorStopped("the writer is closing")
            await self._wait_for_room()
        held = self._deps.accept(key, item, id, after, True) if after else None
        if held is None:
            if id is not None:
                hash(key)  # an unhashable key fails before the id is taken
                self._deps.register(id)
            self._buffered += 1
        else:
            try:
                await held.event.wait()
            except BaseException:
                if held.failed_on is None:  # withdraw, released or not
                    if held.done:
                        self._deps.releasing -= 1
                    else:
                        self._deps.unhold(held)
                    self._withdraw(id, "its write_sync was cancelled")
                raise
            if held.failed_on is None:
                self._deps.releasing -= 1
            else:
                dependency, reason = held.failed_on
                if dependency is TORN_DOWN:
                    raise keybatch.ProcessorStopped(reason)
                raise DependencyFailed(
                    key, dependency_message(id, dependency, reason), dependency
                )
        entry = Entry()
        try:
            await self._proc.run(key, append_sync, item, id, entry)
        except keybatch.SaveError as exc:
            buffer = entry.buffer
            attempts = buffer.attempts if buffer is not None else 0
            raise WriteError(
                key,
                f"flushing {len(buffer.items) if buffer else 0} items to key"
                f" {key!r} failed after {attempts} attempt(s)",
            ) from exc.__cause__
        except BaseException:
            if entry.buffer is None:  # never entered a flush
                self._withdraw(id, "its write_sync was cancelled")
            raise

    # --------------------------------------------------------------- flushing

    async def flush(self) -> None:
        """Flush every buffer now; return once the items accepted before the call
        were written or failed.

        Items held for their dependencies are flushed as soon as those are
        written, within this call. `flush` raises nothing about failed items
        (they go to `on_error`).

        Cancellation: stops the wait; the flushes already started go on.
        This is always a checkpoint.
        """
        deps = self._deps
        mark = deps.held_seq  # items held before the call have seq <= mark
        while True:
            released = deps.released
            await self._proc.flush()
            if deps.released != released:
                continue  # released items were buffered: flush them too
            held = deps.held
            if not held or next(iter(held)) > mark:
                return
            if deps.releasing:
                await _checkpoint()  # released write_sync callers enqueue
            elif not self._proc.statistics().pending_operations:
                return  # nothing left that could release them

    def statistics(self) -> WriterStatistics:
        """Return a snapshot of the writer's counters."""
        return WriterStatistics(
            items_written=self._written,
            flushes=self._flushes,
            failed_flushes=self._failed_flushes,
            failed_items=self._failed_items,
            retries=self._retries,
            buffered=self._buffered,
            held=len(self._deps.held),
            bytes_written=self._bytes,
            dropped_items=self._dropped,
        )

    # ------------------------------------------------------------- internals

    def _withdraw(self, id: Hashable, reason: str) -> None:
        """An accepted item will not be written, and is no failure of the sink."""
        if self._gone:  # counted in dropped_items already
            return
        self._buffered -= 1
        self._room.release(1)
        if id is not None:
            self._deps.fail_ids([(id, reason)])

    async def _wait_for_room(self) -> None:
        await self._room.park()

    def _call_hook(self, hook: Callable[..., object], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:
            logger.exception("keybatch.writer: %s raised; ignored", hook)

    async def _save(self, key: Hashable, buffer: Buffer) -> None:
        # The save of one processor batch: the flush, retries included. It runs
        # shielded in a worker (the core shields saves), with no deadline.
        items = buffer.items
        n = len(items)
        clock = anyio.current_time
        start = clock()
        attempts = 0
        while True:
            attempts += 1
            try:
                result = await self._sink(key, items)
            except Exception as exc:
                if self._retry.should_retry(attempts, exc):
                    self._retries += 1
                    await anyio.sleep(self._retry.delay(attempts))
                    continue
                buffer.attempts = attempts
                self._failed_flushes += 1
                self._failed_items += n
                self._buffered -= n
                self._room.release(n)
                if self._on_error is not None:
                    self._call_hook(self._on_error, key, items, exc)
                if buffer.ids:
                    reason = f"failed to flush ({type(exc).__name__}: {exc})"
                    self._deps.fail_ids([(id, reason) for id in buffer.ids])
                self._report(key, n, attempts, start, clock() - start, None, exc)
                raise
            break
        buffer.attempts = attempts
        nbytes = result if type(result) is int else None
        self._flushes += 1
        self._written += n
        self._buffered -= n
        if nbytes is not None:
            self._bytes += nbytes
        self._room.release(n)
        if buffer.ids:
            self._deps.written_ids(buffer.ids)
        self._report(key, n, attempts, start, clock() - start, nbytes, None)

    def _report(
        self,
        key: Hashable,
        n: int,
        attempts: int,
        start: float,
        duration: float,
        nbytes: int | None,
        error: BaseException | None,
    ) -> None:
        if self._on_flush is not None:
            report = FlushReport(key, n, attempts, start, duration, nbytes, error)
            self._call_hook(self._on_flush, report)

    async def _drain(self) -> None:
        # Graceful close: refuse new items, then flush until nothing is left
        # (held items are released by the flushes of what they wait for).
        self._closing = True
        self._room.release_all()
        proc = self._proc
        while self._buffered > 0:
            if proc.statistics().pending_operations:
                await proc.flush()
            elif self._deps.releasing:
                await _checkpoint()  # released write_sync callers enqueue
            else:
                break  # nothing could make progress: the rest is dropped

    def _torn_down(self) -> None:
        # The processor is gone: whatever is still buffered will never be written.
        self._closing = self._gone = True
        self._room.release_all()
        self._deps.drop_held()
        self._dropped += self._buffered
        self._buffered = 0
