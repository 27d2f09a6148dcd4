"""A buffered writer: items go to a bulk sink in batches, per key.

``async with open_writer(sink) as writer:`` then ``await writer.write(item)``
from any task. Items are buffered per key and handed to ``await sink(key,
items)`` when the key's buffer holds ``batch_size`` items or ``flush_interval``
seconds after its first item, whichever comes first. Transient sink failures are
retried with exponential backoff; items that finally fail go to ``on_error``.

Built on the public :func:`keybatch.open_processor` only: one batch of the
processor is one flush. Its resource is a fresh buffer, each write is an
operation that appends to it, its save calls the sink (retries included), and
its workers bound the flushes in flight.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, final

import anyio

import keybatch
from keybatch._util import NoPublicConstructor

__all__ = [
    "DependencyFailed",
    "FlushReport",
    "WriteError",
    "Writer",
    "WriterStatistics",
    "exponential_backoff",
    "open_writer",
]

T = TypeVar("T")

logger = logging.getLogger("keybatch.writer")

_checkpoint = anyio.lowlevel.checkpoint


class WriteError(keybatch.BatchError):
    """An item was not written: the flush that held it failed for good.

    ``__cause__`` is the exception of the sink's last attempt.

    Attributes:
        key: The key (buffer) the item was written to.
    """


class DependencyFailed(WriteError):
    """An item was not written because an item it waited for was not written.

    Attributes:
        key: The key the dependent item was written to.
        dependency: The ``id`` of the item it waited for (named in ``after=``).
    """

    def __init__(self, key: Hashable, message: str, dependency: Hashable) -> None:
        super().__init__(key, message)
        self.dependency = dependency


@dataclass(frozen=True)
class FlushReport:
    """What one flush did; passed to the ``on_flush`` hook.

    Attributes:
        key: The key whose buffer was flushed.
        items: Number of items in the flush.
        attempts: Sink calls made (1 + retries).
        start: When the first attempt began (``anyio.current_time()``).
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
    """A snapshot of a writer, returned by :meth:`Writer.statistics`.

    Attributes:
        items_written: Items the sink accepted.
        flushes: Flushes that succeeded.
        failed_flushes: Flushes that failed for good.
        failed_items: Items that failed for good (their flush failed, or an item
            they waited for was not written); each went to ``on_error``.
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


def exponential_backoff(
    initial: float = 0.1, maximum: float = 10.0, *, jitter: bool = True
) -> Callable[[int], float]:
    """Return a ``backoff(retry) -> seconds`` function for :func:`open_writer`.

    Retry ``n`` (1 for the first retry) waits ``min(maximum, initial * 2**(n-1))``
    seconds; with ``jitter``, a random duration between half of that and all of it,
    so writers that failed together do not retry together.

    Raises:
        ValueError: ``initial`` or ``maximum`` is negative or not finite.
    """
    for name, value in (("initial", initial), ("maximum", maximum)):
        if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    def backoff(retry: int) -> float:
        delay: float = min(maximum, initial * 2.0 ** min(retry - 1, 64))
        if jitter:
            delay = random.uniform(delay / 2, delay)
        return delay

    return backoff


def _retry_transient(exc: BaseException) -> bool:
    return isinstance(exc, (OSError, TimeoutError))


class _Buffer:
    """The resource of one flush: its items, and the ids among them."""

    __slots__ = ("items", "ids", "attempts")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.ids: list[Hashable] = []
        self.attempts = 0


class _Entry:
    """A write_sync item: whether it entered a flush, and which one."""

    __slots__ = ("buffer",)

    def __init__(self) -> None:
        self.buffer: _Buffer | None = None


class _Held:
    """An item waiting for the items named in its ``after=``."""

    __slots__ = ("key", "item", "id", "seq", "missing", "done", "event", "failed_on")

    def __init__(self, key: Hashable, item: Any, id: Hashable, seq: int) -> None:
        self.key = key
        self.item = item
        self.id = id
        self.seq = seq
        self.missing = 0  # dependencies not written yet
        self.done = False  # released, failed or withdrawn
        self.event: Any = None  # set for a write_sync caller
        self.failed_on: tuple[Hashable, str] | None = None  # (dependency, reason)


async def _new_buffer(key: Hashable) -> _Buffer:
    return _Buffer()


def _append(buffer: _Buffer, item: Any) -> None:
    buffer.items.append(item)


def _append_id(buffer: _Buffer, item: Any, id: Hashable) -> None:
    buffer.items.append(item)
    buffer.ids.append(id)


def _append_sync(buffer: _Buffer, item: Any, id: Hashable, entry: _Entry) -> None:
    entry.buffer = buffer
    buffer.items.append(item)
    if id is not None:
        buffer.ids.append(id)


_TORN_DOWN = object()  # held.failed_on[0] of items dropped by a teardown


def _route(key: Hashable, workers: int) -> int:
    # str and bytes keys: keybatch's stable mmh3 routing; other keys: hash().
    if key is None:
        return 0
    if isinstance(key, (str, bytes)):
        return keybatch.worker_for_key(key, workers)
    return hash(key) % workers


@final
class Writer(Generic[T], metaclass=NoPublicConstructor):
    """Buffers items per key and flushes them to the sink; built by :func:`open_writer`.

    ``T`` is the type of the items.
    """

    __slots__ = (
        "_proc",
        "_sink",
        "_interval",
        "_max_buffered",
        "_max_retries",
        "_retry_on",
        "_backoff",
        "_on_error",
        "_on_flush",
        "_closing",
        "_room_waiters",
        "_buffered",
        "_pending_ids",
        "_failed_ids",
        "_held",
        "_held_seq",
        "_released",
        "_releasing",
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
        max_retries: int,
        retry_on: Callable[[BaseException], bool],
        backoff: Callable[[int], float],
        on_error: Callable[[Any, list[T], BaseException], object] | None,
        on_flush: Callable[[FlushReport], object] | None,
    ) -> None:
        self._proc: keybatch.Processor[_Buffer] = None  # type: ignore[assignment]
        self._sink = sink
        self._interval = interval
        self._max_buffered = max_buffered
        self._max_retries = max_retries
        self._retry_on = retry_on
        self._backoff = backoff
        self._on_error = on_error
        self._on_flush = on_flush
        self._closing = False
        self._room_waiters: deque[anyio.Event] = deque()
        self._buffered = 0
        # ids of items accepted and not written yet -> items held on them
        self._pending_ids: dict[Hashable, list[_Held] | None] = {}
        self._failed_ids: dict[Hashable, str] = {}  # id -> why it was not written
        self._held: dict[int, _Held] = {}
        self._held_seq = 0
        self._released = 0
        self._releasing = 0  # released write_sync items not enqueued yet
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
        """Seconds a key's buffer waits after its first item: ``flush_interval``
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
        """Buffer ``item`` for ``key``; return without waiting for the flush.

        Args:
            item: What to write; the sink gets it in a list with its batch.
            key: Selects the buffer (a collection, a database, a tenant).
                Any hashable; default None, one buffer.
            id: Names the item so that later items can wait for it. Any hashable
                but None; unique among the items not written yet.
            after: ids of items this one must be written after. It is held
                until each of them was flushed successfully; if one of them
                fails, this item fails too (``on_error`` gets a
                :class:`DependencyFailed`). ids not buffered now count as written
                unless they failed.

        A failure to write the item later goes to ``on_error``, not here.

        Raises:
            keybatch.ProcessorStopped: The writer is closing.
            ValueError: ``id`` is already buffered, or ``after`` names it.
            TypeError: ``key`` is not hashable.

        Cancellation: while waiting for room (more than ``max_buffered`` items
        buffered), cancelling accepts nothing. Otherwise the item is accepted
        at once; cancellation cannot reach it. This is always a checkpoint.
        """
        await _checkpoint()
        while self._closing or self._buffered >= self._max_buffered:
            if self._closing:
                raise keybatch.ProcessorStopped("the writer is closing")
            await self._wait_for_room()
        if id is None and not after:  # the hot path
            self._proc.submit(key, _append, item)
            self._buffered += 1
        else:
            self._accept(key, item, id, after, False)

    def write_nowait(
        self,
        item: T,
        *,
        key: Hashable = None,
        id: Hashable = None,
        after: Iterable[Hashable] = (),
    ) -> None:
        """Like :meth:`write`, but raise :class:`keybatch.Overloaded` instead of
        waiting when ``max_buffered`` items are buffered.

        Raises:
            keybatch.Overloaded: ``max_buffered`` items are buffered; nothing
                was accepted.
            keybatch.ProcessorStopped, ValueError, TypeError: As for :meth:`write`.
        """
        if self._closing:
            raise keybatch.ProcessorStopped("the writer is closing")
        if self._buffered >= self._max_buffered:
            raise keybatch.Overloaded(
                f"max_buffered={self._max_buffered} items are buffered"
            )
        if id is None and not after:
            self._proc.submit(key, _append, item)
            self._buffered += 1
        else:
            self._accept(key, item, id, after, False)

    async def write_sync(
        self,
        item: T,
        *,
        key: Hashable = None,
        id: Hashable = None,
        after: Iterable[Hashable] = (),
    ) -> None:
        """Buffer ``item`` like :meth:`write`; return once the flush holding it
        succeeded.

        Arguments as for :meth:`write`.

        Raises:
            WriteError: The flush failed for good (``__cause__`` is the sink's
                last exception); ``on_error`` got the item too.
            DependencyFailed: An item named in ``after`` was not written.
            keybatch.ProcessorStopped: The writer is closing, or was torn down
                before the item entered a flush.
            ValueError, TypeError: As for :meth:`write`.

        Cancellation: before the item entered a flush (waiting for room, for its
        dependencies, or in the buffer) it is withdrawn: never written, and
        items waiting for its ``id`` fail. Once its flush began, the item is
        written (or fails) as if nobody had cancelled; only the outcome is lost.
        This is always a checkpoint.
        """
        await _checkpoint()
        while self._closing or self._buffered >= self._max_buffered:
            if self._closing:
                raise keybatch.ProcessorStopped("the writer is closing")
            await self._wait_for_room()
        held = self._accept(key, item, id, after, True) if after else None
        if held is None:
            if id is not None:
                hash(key)  # an unhashable key fails before the id is taken
                self._register(id)
            self._buffered += 1
        else:
            try:
                await held.event.wait()
            except BaseException:
                if held.failed_on is None:  # withdraw, released or not
                    if held.done:
                        self._releasing -= 1
                    else:
                        self._unhold(held)
                    self._withdraw(id, "its write_sync was cancelled")
                raise
            if held.failed_on is None:
                self._releasing -= 1
            else:
                dependency, reason = held.failed_on
                if dependency is _TORN_DOWN:
                    raise keybatch.ProcessorStopped(reason)
                raise DependencyFailed(
                    key, _dependency_message(id, dependency, reason), dependency
                )
        entry = _Entry()
        try:
            await self._proc.run(key, _append_sync, item, id, entry)
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
        written, within this call. ``flush`` raises nothing about failed items
        (they go to ``on_error``).

        Cancellation: stops the wait; the flushes already started go on.
        This is always a checkpoint.
        """
        mark = self._held_seq  # items held before the call have seq <= mark
        while True:
            released = self._released
            await self._proc.flush()
            if self._released != released:
                continue  # released items were buffered: flush them too
            held = self._held
            if not held or next(iter(held)) > mark:
                return
            if self._releasing:
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
            held=len(self._held),
            bytes_written=self._bytes,
            dropped_items=self._dropped,
        )

    # ------------------------------------------------------------- internals

    def _accept(
        self,
        key: Hashable,
        item: Any,
        id: Hashable,
        after: Iterable[Hashable],
        sync: bool,
    ) -> _Held | None:
        """Accept an item with an id or dependencies.

        write/write_nowait: submitted, held, or failed at once (on_error).
        write_sync: returns the _Held to wait on, or None when the caller may
        enqueue at once (it registers the id and counts the item itself).
        """
        hash(key)  # unhashable keys fail now, not when a held item is released
        deps = list(after)
        if id is not None:
            if id in self._pending_ids:
                raise ValueError(f"id {id!r} is already buffered")
            if id in deps:
                raise ValueError(f"item {id!r} cannot be written after itself")
        failed = next((d for d in deps if d in self._failed_ids), None)
        waiting = [d for d in deps if d in self._pending_ids]
        if failed is None and not waiting:
            if sync:
                return None
            if id is None:
                self._proc.submit(key, _append, item)
            else:
                self._proc.submit(key, _append_id, item, id)
                self._register(id)
            self._buffered += 1
            return None
        self._held_seq += 1
        held = _Held(key, item, id, self._held_seq)
        if sync:
            held.event = anyio.Event()
        self._buffered += 1
        if id is not None:
            self._register(id)
        self._held[held.seq] = held
        if failed is not None:
            self._fail_held(held, failed, self._failed_ids[failed])
            return held
        pending = self._pending_ids
        for dep in waiting:
            dependents = pending[dep]
            if dependents is None:
                pending[dep] = dependents = []
            dependents.append(held)
            held.missing += 1
        return held

    def _register(self, id: Hashable) -> None:
        if id in self._pending_ids:
            raise ValueError(f"id {id!r} is already buffered")
        self._failed_ids.pop(id, None)
        self._pending_ids[id] = None

    def _unhold(self, held: _Held) -> None:
        held.done = True
        del self._held[held.seq]

    def _release(self, held: _Held) -> None:
        """Every dependency of a held item was written: buffer it."""
        self._unhold(held)
        self._released += 1
        if held.event is not None:
            self._releasing += 1
            held.event.set()  # the write_sync caller enqueues it
            return
        try:
            if held.id is None:
                self._proc.submit(held.key, _append, held.item)
            else:
                self._proc.submit(held.key, _append_id, held.item, held.id)
        except keybatch.ProcessorStopped:  # torn down meanwhile
            self._dropped += 1
            self._withdraw(held.id, "the writer was torn down before it was flushed")

    def _withdraw(self, id: Hashable, reason: str) -> None:
        """An accepted item will not be written, and is no failure of the sink."""
        if self._gone:  # counted in dropped_items already
            return
        self._buffered -= 1
        self._free_room(1)
        if id is not None:
            self._fail_ids([(id, reason)])

    def _fail_held(self, held: _Held, dependency: Hashable, reason: str) -> None:
        self._fail_ids([], [(held, dependency, reason)])

    def _fail_ids(
        self,
        ids: list[tuple[Hashable, str]],
        helds: list[tuple[_Held, Hashable, str]] | None = None,
    ) -> None:
        """Mark ids as not written and fail, transitively, the items held on them."""
        todo = deque(ids)  # first in, first out: on_error sees them in order
        stack = deque(helds or ())
        pending = self._pending_ids
        while True:
            while todo:
                id, reason = todo.popleft()
                self._failed_ids[id] = reason
                for held in pending.pop(id, None) or ():
                    if not held.done:
                        stack.append((held, id, reason))
            if not stack:
                return
            held, dependency, reason = stack.popleft()
            if held.done:
                continue
            self._unhold(held)
            held.failed_on = (dependency, reason)
            self._buffered -= 1
            self._failed_items += 1
            self._free_room(1)
            if held.id is not None:
                # Not nested further: a long chain keeps short messages.
                todo.append(
                    (held.id, f"was not written (it waited for {dependency!r})")
                )
            if held.event is not None:
                held.event.set()
            if self._on_error is not None:
                error = DependencyFailed(
                    held.key,
                    _dependency_message(held.id, dependency, reason),
                    dependency,
                )
                self._call_hook(self._on_error, held.key, [held.item], error)

    def _free_room(self, n: int) -> None:
        waiters = self._room_waiters
        while n > 0 and waiters:
            waiters.popleft().set()
            n -= 1

    async def _wait_for_room(self) -> None:
        event = anyio.Event()
        self._room_waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            try:
                self._room_waiters.remove(event)
            except ValueError:  # already woken: pass the room on
                self._free_room(1)
            raise

    def _call_hook(self, hook: Callable[..., object], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:
            logger.exception("keybatch.writer: %s raised; ignored", hook)

    async def _save(self, key: Hashable, buffer: _Buffer) -> None:
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
                if attempts <= self._max_retries and self._should_retry(exc):
                    self._retries += 1
                    await anyio.sleep(self._delay(attempts))
                    continue
                buffer.attempts = attempts
                self._failed_flushes += 1
                self._failed_items += n
                self._buffered -= n
                self._free_room(n)
                if self._on_error is not None:
                    self._call_hook(self._on_error, key, items, exc)
                if buffer.ids:
                    reason = f"failed to flush ({type(exc).__name__}: {exc})"
                    self._fail_ids([(id, reason) for id in buffer.ids])
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
        self._free_room(n)
        if buffer.ids:
            pending = self._pending_ids
            for id in buffer.ids:
                for held in pending.pop(id, None) or ():
                    if not held.done:
                        held.missing -= 1
                        if held.missing == 0:
                            self._release(held)
        self._report(key, n, attempts, start, clock() - start, nbytes, None)

    def _should_retry(self, exc: Exception) -> bool:
        try:
            return bool(self._retry_on(exc))
        except Exception:
            logger.exception("keybatch.writer: retry_on raised; not retrying")
            return False

    def _delay(self, retry: int) -> float:
        try:
            delay = float(self._backoff(retry))
        except Exception:
            logger.exception("keybatch.writer: backoff raised; retrying at once")
            return 0.0
        return delay if delay > 0 else 0.0  # negative and NaN: at once

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
        self._free_room(len(self._room_waiters))
        proc = self._proc
        while self._buffered > 0:
            if proc.statistics().pending_operations:
                await proc.flush()
            elif self._releasing:
                await _checkpoint()  # released write_sync callers enqueue
            else:
                break  # nothing could make progress: the rest is dropped

    def _torn_down(self) -> None:
        # The processor is gone: whatever is still buffered will never be written.
        self._closing = self._gone = True
        self._free_room(len(self._room_waiters))
        for held in list(self._held.values()):
            self._unhold(held)
            held.failed_on = (_TORN_DOWN, "the writer was torn down")
            if held.event is not None:
                held.event.set()
        self._dropped += self._buffered
        self._buffered = 0


def _dependency_message(id: Hashable, dependency: Hashable, reason: str) -> str:
    what = "the item" if id is None else f"item {id!r}"
    return f"{what} was not written: it waited for {dependency!r}, which {reason}"


def open_writer(
    sink: Callable[[Any, list[T]], Awaitable[object]],
    *,
    batch_size: int = 5000,
    flush_interval: float = 1.0,
    jitter: float = 0.0,
    concurrent_flushes: int = 2,
    max_buffered: int | None = None,
    max_retries: int = 3,
    retry_on: Callable[[BaseException], bool] | None = None,
    backoff: Callable[[int], float] | None = None,
    on_error: Callable[[Any, list[T], BaseException], object] | None = None,
    on_flush: Callable[[FlushReport], object] | None = None,
) -> AbstractAsyncContextManager[Writer[T]]:
    """Open a buffered writer: an async context manager yielding a :class:`Writer`.

    Leaving the block flushes everything buffered (held items too) and waits for
    it: nothing accepted is lost. If the block raises or is cancelled instead,
    flushes in progress finish (retries included) and the rest is dropped
    (counted in ``dropped_items``).

    Args:
        sink: ``async sink(key, items)``: writes a list of items in one call.
            It may return the number of bytes it sent (an int), summed in
            ``bytes_written``; anything else is ignored.
        batch_size: Flush a key's buffer once it holds this many items.
        flush_interval: Seconds after a key's first buffered item when its buffer
            is flushed anyway. Items that arrive while the key's previous flush
            is in progress wait for it to end, then ``flush_interval``.
        jitter: Up to this many seconds are added to ``flush_interval``: a random
            amount drawn once when the writer opens (so that many writers
            started together do not flush together); see
            :attr:`Writer.flush_interval`.
        concurrent_flushes: At most this many sink calls at once. Each key is
            served by one of that many flush tasks, picked by
            :func:`keybatch.worker_for_key` for str and bytes keys, by
            ``hash(key)`` for others: a slow or retrying flush delays the other
            keys of its task.
        max_buffered: Bound on buffered items (default ``10 * batch_size``):
            ``write`` waits for room, ``write_nowait`` raises
            :class:`keybatch.Overloaded`.
        max_retries: Retries of a failed sink call that ``retry_on`` accepts.
        retry_on: ``retry_on(exc) -> bool``: is this failure transient? Default:
            OSError and TimeoutError are.
        backoff: ``backoff(retry) -> seconds`` to wait before retry number
            ``retry`` (1, 2, ...). Default ``exponential_backoff()``: 0.1 s
            doubling up to 10 s, with jitter. The wait does not block new writes.
        on_error: ``on_error(key, items, exc)``, a plain callable, for items that
            failed for good: ``exc`` is the sink's last exception, or a
            :class:`DependencyFailed`. Exceptions it raises are logged.
        on_flush: ``on_flush(report)``, a plain callable, after each flush,
            successful or not, with a :class:`FlushReport`. Exceptions it raises
            are logged.

    Raises:
        TypeError: ``sink`` is not an async callable, a hook is not a plain
            callable, or a size is not an int.
        ValueError: A negative or non-finite duration, or a size below its minimum.
    """
    if not callable(sink) or not _is_async(sink):
        raise TypeError(f"sink must be an async function, got {sink!r}")
    for name, fn in (
        ("retry_on", retry_on),
        ("backoff", backoff),
        ("on_error", on_error),
        ("on_flush", on_flush),
    ):
        if fn is not None and (not callable(fn) or _is_async(fn)):
            raise TypeError(f"{name} must be a plain (non-async) callable, got {fn!r}")
    for name, value in (("flush_interval", flush_interval), ("jitter", jitter)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number of seconds, got {value!r}")
        if not 0 <= value < math.inf:
            raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    if max_buffered is None and isinstance(batch_size, int):
        max_buffered = 10 * batch_size
    for name, count, least in (
        ("batch_size", batch_size, 1),
        ("concurrent_flushes", concurrent_flushes, 1),
        ("max_buffered", max_buffered, 1),
        ("max_retries", max_retries, 0),
    ):
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"{name} must be an int, got {count!r}")
        if count < least:
            raise ValueError(f"{name} must be at least {least}, got {count!r}")
    assert max_buffered is not None
    interval = float(flush_interval) + (random.uniform(0, jitter) if jitter else 0.0)
    return _open(
        sink,
        interval,
        batch_size,
        concurrent_flushes,
        max_buffered,
        max_retries,
        retry_on if retry_on is not None else _retry_transient,
        backoff if backoff is not None else exponential_backoff(),
        on_error,
        on_flush,
    )


def _is_async(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004  (objects with async __call__)
    )


@asynccontextmanager
async def _open(
    sink: Callable[[Any, list[T]], Awaitable[object]],
    interval: float,
    batch_size: int,
    concurrent_flushes: int,
    max_buffered: int,
    max_retries: int,
    retry_on: Callable[[BaseException], bool],
    backoff: Callable[[int], float],
    on_error: Callable[[Any, list[T], BaseException], object] | None,
    on_flush: Callable[[FlushReport], object] | None,
) -> AsyncIterator[Writer[T]]:
    writer: Writer[T] = Writer._create(
        sink,
        interval,
        max_buffered,
        max_retries,
        retry_on,
        backoff,
        on_error,
        on_flush,
    )
    try:
        async with keybatch.open_processor(
            load=_new_buffer,
            save=writer._save,
            min_duration=interval,
            max_duration=math.inf,  # retries must not be cut by a batch deadline
            workers=concurrent_flushes,
            worker_for_key=_route,
            max_ops=batch_size,
        ) as proc:
            writer._proc = proc
            try:
                yield writer
            except BaseException:
                writer._closing = True
                writer._free_room(len(writer._room_waiters))
                raise
            await writer._drain()
    finally:
        writer._torn_down()
