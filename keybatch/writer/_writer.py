"""The writer: per-key buffers, a timer, flush slots, retries and results."""

from __future__ import annotations

import heapq
import logging
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar, final

import anyio

import keybatch
from keybatch._util import NoPublicConstructor

from ._entry import BUFFERED, DONE, FLUSHING, HELD, Entry
from ._errors import DependencyFailed, WriteError
from ._graph import HELD_BACK, DependencyGraph, Doomed, dependency_message
from ._keys import Flush, FlushWait, KeyState
from ._records import FailedItem, FlushReport, Partial, WriteResults, WriterStatistics
from ._retry import RetryPolicy
from ._room import RoomQueue

__all__ = ["Writer"]

T = TypeVar("T")

logger = logging.getLogger("keybatch.writer")

NO_DEPS: tuple[Hashable, ...] = ()

# The writer's life.
RUNNING = 0
CLOSING = 1  # no new items; what is accepted is flushed (or dropped)
STOPPED = 2


@final
class Writer(Generic[T], metaclass=NoPublicConstructor):
    """Buffers items per key and flushes them to the sink; built by
    [`open_writer`][keybatch.writer.open_writer].

    `T` is the type of the items.
    """

    __slots__ = (
        "_sink",
        "_batch_size",
        "_interval",
        "_jitter",
        "_max_buffered",
        "_retry",
        "_on_error",
        "_on_flush",
        "_close_timeout",
        "_state",
        "_aborting",
        "_keys",
        "_ready",
        "_free",
        "_slot_waiters",
        "_timers",
        "_timer_wake",
        "_timer_at",
        "_timer_seq",
        "_graph",
        "_room",
        "_count",
        "_seq",
        "_flush_waits",
        "_urgent",
        "_running",
        "_drained",
        "_close_deadline",
        "_scope_deadline",
        "_spawn",
        "_cancel_all",
        "_clock",
        "_checkpoint",
        "_new_event",
        "_cancelled",
        "_failures",
        "_succeeded",
        "_omitted",
        "_fatal",
        "_written",
        "_flushes",
        "_failed_flushes",
        "_failed_items",
        "_retries",
        "_bytes",
        "_dropped",
        "_withdrawn",
    )

    def __init__(
        self,
        sink: Callable[[Any, list[T]], Awaitable[object]],
        batch_size: int,
        interval: float,
        jitter: float,
        concurrent_flushes: int,
        max_buffered: int,
        retry: RetryPolicy,
        on_error: Callable[[Any, list[T], BaseException], object] | None,
        on_flush: Callable[[FlushReport], object] | None,
        close_timeout: float | None,
        max_failed_ids: int,
        max_results: int,
    ) -> None:
        self._sink = sink
        self._batch_size = batch_size
        self._interval = interval
        self._jitter = jitter
        self._max_buffered = max_buffered
        self._retry = retry
        self._on_error = on_error
        self._on_flush = on_flush
        self._close_timeout = close_timeout
        self._state = RUNNING
        self._aborting = False
        self._keys: dict[Hashable, KeyState] = {}
        self._ready: deque[KeyState] = deque()  # due, waiting for a slot
        self._free = concurrent_flushes  # slots: sink calls that may start
        self._slot_waiters: deque[Any] = deque()  # retries waiting for a slot
        self._timers: list[tuple[float, int, KeyState]] = []  # a heap
        self._timer_wake: Any = None
        self._timer_at = math.inf  # when the timer task wakes up next
        self._timer_seq = 0
        self._graph = DependencyGraph(max_failed_ids)
        self._room = RoomQueue()
        self._count = 0  # accepted entries not DONE
        self._seq = 0  # entries accepted so far
        self._flush_waits: list[FlushWait] = []
        self._urgent = 0  # entries with seq <= this are flushed without delay
        self._running: set[Flush] = set()  # flushes in progress
        self._drained: Any = None  # set when closing and nothing is left
        self._close_deadline = math.inf  # when closing must be over
        self._scope_deadline = math.inf  # the flushes' steps end by then
        self._spawn: Callable[..., object] = _not_open
        self._cancel_all: Callable[[], object] = _not_open
        self._clock: Callable[[], float] = anyio.current_time
        self._checkpoint: Callable[[], Awaitable[object]] = anyio.lowlevel.checkpoint
        self._new_event: Callable[[], Any] = anyio.Event
        self._cancelled: type[BaseException] = BaseException
        self._failures: deque[FailedItem] = deque(maxlen=max_results)
        self._succeeded = 0
        self._omitted = 0
        self._fatal: BaseException | None = None
        self._written = 0
        self._flushes = 0
        self._failed_flushes = 0
        self._failed_items = 0
        self._retries = 0
        self._bytes = 0
        self._dropped = 0
        self._withdrawn = 0

    def __repr__(self) -> str:
        state = ("open", "closing", "closed")[self._state]
        return f"<keybatch.writer.Writer {state} buffered={self._count}>"

    @property
    def flush_interval(self) -> float:
        """Seconds a key's buffer waits after its first item, before the
        jitter (a random 0 to `jitter` seconds drawn anew for every flush)."""
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
            after: A collection of ids (a list, a tuple, a set) of items this
                one must be written after; a str or bytes is refused, not taken
                for one id. The item is held until each of them was written;
                if one of them is not written, this item fails too (`on_error`
                gets a [`DependencyFailed`][keybatch.writer.DependencyFailed]).
                ids not buffered now count as written unless they failed
                (among the last `max_failed_ids` failures).

        A failure to write the item later goes to `on_error` and
        [`results`][keybatch.writer.Writer.results], not here.

        Raises:
            keybatch.ProcessorStopped: The writer is closing or closed.
            ValueError: `id` is already buffered, or `after` names it.
            TypeError: `key` or `id` is not hashable, or `after` is not a
                collection of hashable ids.

        The checks come first: an item that would be refused is refused at
        once, even when the writer is full.

        Cancellation: while waiting for room (more than `max_buffered` items
        unfinished), cancelling accepts nothing. Otherwise the item is accepted
        at once; cancellation cannot reach it. This is always a checkpoint.
        """
        await self._checkpoint()
        if id is None and after is NO_DEPS:  # the hot path
            hash(key)
            while self._state or self._count >= self._max_buffered:
                if self._state:
                    raise keybatch.ProcessorStopped("the writer is closing")
                await self._room.park()
            self._seq += 1
            self._count += 1
            self._buffer(Entry(item, key, None, self._seq))
            return
        deps = self._check(key, id, after)
        if self._state == RUNNING and self._count >= self._max_buffered:
            await self._wait_for_room()
            try:
                self._check(key, id, deps)  # the ids may have moved meanwhile
            except BaseException:
                self._room.pass_on()  # a refused waiter passes its room on
                raise
        entry = self._accept(item, key, id, deps)
        if entry.failure is not None:
            self._report_doomed_now(entry)

    def write_nowait(
        self,
        item: T,
        *,
        key: Hashable = None,
        id: Hashable = None,
        after: Iterable[Hashable] = (),
    ) -> None:
        """Like [`write`][keybatch.writer.Writer.write], but raise
        [`keybatch.Overloaded`][keybatch.Overloaded] instead of waiting when
        `max_buffered` items are unfinished.

        Raises:
            keybatch.Overloaded: `max_buffered` items are unfinished; nothing
                was accepted.
            keybatch.ProcessorStopped, ValueError, TypeError: As for
                [`write`][keybatch.writer.Writer.write].
        """
        if id is None and after is NO_DEPS:
            hash(key)
            deps = NO_DEPS
        else:
            deps = self._check(key, id, after)
        if self._state:
            raise keybatch.ProcessorStopped("the writer is closing")
        if self._count >= self._max_buffered:
            raise keybatch.Overloaded(
                f"max_buffered={self._max_buffered} items are buffered"
            )
        entry = self._accept(item, key, id, deps)
        if entry.failure is not None:
            self._report_doomed_now(entry)

    async def write_sync(
        self,
        item: T,
        *,
        key: Hashable = None,
        id: Hashable = None,
        after: Iterable[Hashable] = (),
    ) -> None:
        """Buffer `item` like [`write`][keybatch.writer.Writer.write]; return
        once it was written.

        Arguments as for `write`.

        Raises:
            WriteError: The item was not written: its sink call failed for
                good (`__cause__` is the sink's last exception, or the one a
                [`Partial`][keybatch.writer.Partial] gave this item), or was
                cut short by `close_timeout` (`may_have_landed` is then True).
                `on_error` got the item too.
            DependencyFailed: An item named in `after` was not written.
            keybatch.ProcessorStopped: The writer is closing, or stopped before
                the item entered a sink call (the item was dropped).
            ValueError, TypeError: As for `write`.
            BaseException: Not raised here: if the sink raises one that is not
                an Exception (KeyboardInterrupt), this caller gets a
                `WriteError` whose `__cause__` it is, and the block re-raises
                it.

        Cancellation: before the item entered a flush (waiting for room, for
        its dependencies, or in the buffer) it is withdrawn: never written, and
        items waiting for its `id` fail. Once its flush began, the item is
        written (or fails) as if nobody had cancelled; only the outcome is lost.
        This is always a checkpoint.
        """
        await self._checkpoint()
        deps = self._check(key, id, after)
        if self._state == RUNNING and self._count >= self._max_buffered:
            await self._wait_for_room()
            try:
                self._check(key, id, deps)  # the ids may have moved meanwhile
            except BaseException:
                self._room.pass_on()  # a refused waiter passes its room on
                raise
        entry = self._accept(item, key, id, deps, self._new_event())
        if entry.failure is not None:  # an id it names failed already
            self._report_doomed_now(entry)
        if entry.state != DONE:
            try:
                await entry.waiter.wait()
            except BaseException:
                if entry.state in (HELD, BUFFERED):
                    self._withdraw(entry)
                raise
        failure = entry.failure
        if failure is not None:
            cls, args, kwargs, cause = failure
            raise cls(*args, **kwargs) from cause

    async def _wait_for_room(self) -> None:
        while self._state == RUNNING and self._count >= self._max_buffered:
            await self._room.park()
        if self._state:
            raise keybatch.ProcessorStopped("the writer is closing")

    def _check(
        self, key: Hashable, id: Hashable, after: Iterable[Hashable]
    ) -> tuple[Hashable, ...]:
        hash(key)  # every key, held item or not: nothing accepted breaks later
        if self._state:
            raise keybatch.ProcessorStopped("the writer is closing")
        return self._graph.check(id, after)

    def _accept(
        self,
        item: T,
        key: Hashable,
        id: Hashable,
        deps: tuple[Hashable, ...],
        waiter: Any = None,
    ) -> Entry:
        """Take a checked item: buffer it, hold it, or fail it at once."""
        self._seq += 1
        self._count += 1
        entry = Entry(item, key, id, self._seq)
        entry.waiter = waiter
        if id is None and not deps:
            self._buffer(entry)
            return entry
        verdict = self._graph.add(entry, deps)
        if verdict is None:
            self._buffer(entry)
        elif verdict is HELD_BACK:
            entry.state = HELD
        else:
            assert isinstance(verdict, Doomed)
            self._doom([verdict], report=False)
        return entry

    # --------------------------------------------------------------- flushing

    async def flush(self) -> None:
        """Flush every buffer now; return once every item accepted before the
        call was written or failed.

        Items held for their dependencies are flushed as soon as those are
        written, within this call. `flush` raises nothing about failed items
        (they go to `on_error` and [`results`][keybatch.writer.Writer.results]).

        Raises:
            keybatch.ProcessorStopped: The writer is closed, or stopped (its
                block raised or was cancelled, or `close_timeout` passed)
                before every item the call covers was written or failed: some
                were dropped.

        Cancellation: stops the wait; the flushes already started go on.
        This is always a checkpoint.
        """
        if self._state == STOPPED or self._aborting:
            raise keybatch.ProcessorStopped("the writer is closed")
        if not self._count:
            await self._checkpoint()
            return
        wait = FlushWait(self._seq, self._count, self._new_event())
        self._flush_waits.append(wait)
        self._urgent = max(self._urgent, wait.mark)
        for keystate in list(self._keys.values()):
            if keystate.buffer and not keystate.flushing and not keystate.queued:
                self._make_ready(keystate)
        try:
            await wait.event.wait()
        finally:
            self._flush_waits.remove(wait)
            self._urgent = max((w.mark for w in self._flush_waits), default=0)
            if self._state == CLOSING and not self._aborting:
                self._urgent = self._seq  # a graceful close flushes everything
        if wait.dropped:
            raise keybatch.ProcessorStopped(
                "the writer stopped before the items this flush() covers were"
                " written: some were dropped"
            )

    def statistics(self) -> WriterStatistics:
        """Return a snapshot of the writer's counters."""
        return WriterStatistics(
            items_written=self._written,
            flushes=self._flushes,
            failed_flushes=self._failed_flushes,
            failed_items=self._failed_items,
            retries=self._retries,
            buffered=self._count,
            held=len(self._graph.held),
            bytes_written=self._bytes,
            dropped_items=self._dropped,
            withdrawn_items=self._withdrawn,
        )

    def results(self, *, clear: bool = False) -> WriteResults:
        """Return the items that were not written so far, and how many were.

        Like WeaviateEx's `get_results`: one record per item that failed for
        good or was dropped, oldest first, and the count of items written.
        At most `max_results` failures are kept (the oldest go first); the
        ones left out are counted in `omitted`.

        Args:
            clear: Start afresh: forget the failures and counts returned.
        """
        results = WriteResults(tuple(self._failures), self._succeeded, self._omitted)
        if clear:
            self._failures.clear()
            self._succeeded = 0
            self._omitted = 0
        return results

    async def aclose(self, *, flush: bool = True) -> list[FailedItem]:
        """Close the writer before the block ends: refuse new items, then
        flush what is accepted (`flush=True`) or drop it (`flush=False`).

        Either way, flushes in progress finish (retries included), within
        `close_timeout` if the writer has one. Leaving the block afterwards
        has nothing left to do. Calling it again returns at once.

        Args:
            flush: False to drop the buffered and held items instead of
                flushing them, as WeaviateEx's `stop(flush: false)`.

        Returns:
            The items dropped by this call, which also went to `on_error`
            and [`results`][keybatch.writer.Writer.results] with a
            [`keybatch.ProcessorStopped`][keybatch.ProcessorStopped].

        Cancellation: the writer is torn down as if its block had been
        cancelled: sink calls in progress finish (within `close_timeout`),
        retries end, the rest is dropped; then the cancellation goes on.
        """
        if self._state != RUNNING:
            if self._drained is not None and self._state != STOPPED:
                await self._drained.wait()  # another close is under way
            else:
                await self._checkpoint()
            return []
        try:
            return await self._close(flush)
        except BaseException:
            self._abort()
            raise

    # ------------------------------------------------------------- buffering

    def _buffer(self, entry: Entry) -> None:
        """Put a ready entry in its key's buffer; flush it when due."""
        keystate = self._keys.get(entry.key)
        if keystate is None:
            keystate = self._keys[entry.key] = KeyState(entry.key)
        entry.state = BUFFERED
        buffer = keystate.buffer
        buffer.append(entry)
        if keystate.flushing or keystate.queued:
            return  # the flush in progress checks again when it ends
        if len(buffer) >= self._batch_size or entry.seq <= self._urgent:
            self._make_ready(keystate)
        elif keystate.due is None:
            self._arm(keystate)

    def _arm(self, keystate: KeyState) -> None:
        """Start the key's flush interval: its own jitter for every flush."""
        due = self._clock() + self._interval
        if self._jitter:
            due += random.uniform(0.0, self._jitter)
        keystate.due = due
        self._timer_seq += 1
        heapq.heappush(self._timers, (due, self._timer_seq, keystate))
        if due < self._timer_at and self._timer_wake is not None:
            self._timer_wake.set()  # the timer sleeps until later: wake it

    def _make_ready(self, keystate: KeyState) -> None:
        keystate.due = None  # its armed timer, if any, is stale
        keystate.queued = True
        self._ready.append(keystate)
        self._pump()

    def _pump(self) -> None:
        """Start flushes while there are free slots: retries first, then keys."""
        if self._close_deadline < math.inf and self._clock() >= self._close_deadline:
            return  # close_timeout passed: nothing new starts; the rest is dropped
        while self._free > 0 and not self._aborting:
            if self._slot_waiters:
                self._free -= 1
                self._slot_waiters.popleft().set()
                continue
            if not self._ready:
                return
            keystate = self._ready.popleft()
            keystate.queued = False
            buffer = keystate.buffer
            if not buffer:  # everything in it was withdrawn
                self._forget_key(keystate)
                continue
            size = self._batch_size
            if len(buffer) <= size:
                entries, keystate.buffer = buffer, []
            else:
                entries = buffer[:size]
                del buffer[:size]
            for entry in entries:
                entry.state = FLUSHING
            keystate.flushing = True
            self._free -= 1
            flush = Flush(keystate, entries, self._clock())
            self._running.add(flush)
            self._spawn(self._run_flush, flush)

    def _forget_key(self, keystate: KeyState) -> None:
        if (
            not keystate.buffer
            and not keystate.flushing
            and not keystate.queued
            and self._keys.get(keystate.key) is keystate
        ):
            keystate.due = None
            del self._keys[keystate.key]

    async def _run_timer(self) -> None:
        """The timer task: makes keys ready when their interval is over.

        Cancellation ends it (the writer's teardown).
        """
        timers = self._timers
        while True:
            now = self._clock()
            while timers and timers[0][0] <= now:
                due, _, keystate = heapq.heappop(timers)
                if keystate.due == due:  # not stale
                    keystate.due = None
                    if keystate.buffer and not keystate.flushing:
                        self._make_ready(keystate)
                    else:
                        self._forget_key(keystate)
            self._timer_at = timers[0][0] if timers else math.inf
            wake = self._timer_wake = self._new_event()
            with anyio.CancelScope(deadline=self._timer_at):
                await wake.wait()
            self._timer_wake = None

    # -------------------------------------------------------------- a flush

    async def _run_flush(self, flush: Flush) -> None:
        """One flush, retries included; it holds a slot when it starts.

        Each step runs in a shielded cancel scope (the writer's teardown does
        not cancel a sink call in progress); `close_timeout` and the teardown
        end them through that scope.
        """
        keystate = flush.keystate
        key = keystate.key
        try:
            while True:
                entries = flush.entries
                flush.attempts += 1
                for entry in entries:
                    entry.attempts += 1
                result, error, interrupted = await self._call_sink(flush, key, entries)
                self._free += 1  # the slot goes back before anything else:
                self._pump()  # a key waiting for it goes while this one backs off
                if interrupted:
                    self._interrupted(flush, entries)
                    break
                if error is not None and not isinstance(
                    error, (Exception, self._cancelled)
                ):
                    # KeyboardInterrupt and the like: these items fail, and the
                    # writer stops; the block re-raises it once torn down.
                    flush.error = error
                    self._fail(flush, [(entry, error) for entry in entries], whole=True)
                    if self._fatal is None:
                        self._fatal = error
                    self._abort()
                    self._cancel_all()
                    break
                failures: list[tuple[Entry, BaseException]]
                if error is not None:
                    flush.error = error
                    failures = [(entry, error) for entry in entries]
                else:
                    flush.error = None
                    failures = self._accepted(flush, entries, result)
                if not failures:
                    break
                retry = self._retry
                again: list[tuple[Entry, BaseException]] = [
                    (entry, exc)
                    for entry, exc in failures
                    if not self._aborting
                    and isinstance(exc, Exception)
                    and retry.should_retry(flush.attempts, exc)
                ]
                if len(again) < len(failures):
                    kept = {id(entry) for entry, _ in again}
                    self._fail(
                        flush,
                        [pair for pair in failures if id(pair[0]) not in kept],
                        whole=error is not None,
                    )
                if not again:
                    break
                self._retries += 1
                if not await self._backoff(flush, retry.delay(flush.attempts)):
                    self._fail(flush, again, whole=error is not None)
                    break
                if not await self._take_slot(flush):
                    self._fail(flush, again, whole=error is not None)
                    break
                flush.entries = [entry for entry, _ in again]
        finally:
            self._flush_done(flush)

    async def _call_sink(
        self, flush: Flush, key: Hashable, entries: list[Entry]
    ) -> tuple[object, BaseException | None, bool]:
        """Call the sink once: (its result, what it raised, cut short?)."""
        result: object = None
        error: BaseException | None = None
        interrupted = False
        with anyio.CancelScope(shield=True, deadline=self._scope_deadline) as scope:
            flush.scope = scope
            flush.in_sink = True
            try:
                result = await self._sink(key, [entry.item for entry in entries])
            except self._cancelled as exc:
                if scope.cancel_called:  # close_timeout: the scope absorbs it
                    interrupted = True
                    raise
                error = exc  # the sink's own doing
            except BaseException as exc:
                error = exc
        flush.scope = None
        flush.in_sink = False
        return result, error, interrupted

    async def _backoff(self, flush: Flush, delay: float) -> bool:
        """Wait before a retry, holding no slot: False if the writer's teardown
        or `close_timeout` ended the retries meanwhile."""
        if self._aborting:
            return False
        with anyio.CancelScope(shield=True, deadline=self._scope_deadline) as scope:
            flush.scope = scope
            await anyio.sleep(delay)
        flush.scope = None
        return not scope.cancel_called

    async def _take_slot(self, flush: Flush) -> bool:
        """Wait for a free slot for a retry (retries go before new flushes)."""
        if self._aborting:
            return False
        if self._free > 0:
            self._free -= 1
            return True
        event = self._new_event()
        self._slot_waiters.append(event)
        with anyio.CancelScope(shield=True, deadline=self._scope_deadline) as scope:
            flush.scope = scope
            await event.wait()
        flush.scope = None
        if event.is_set():
            if not scope.cancel_called:
                return True
            self._free += 1  # granted, but too late: give it back
            self._pump()
        else:
            self._slot_waiters.remove(event)
        return False

    def _accepted(
        self, flush: Flush, entries: list[Entry], result: object
    ) -> list[tuple[Entry, BaseException]]:
        """The sink returned: mark the written entries; return the failed ones."""
        failures: list[tuple[Entry, BaseException]] = []
        nbytes: int | None = None
        if type(result) is int:
            nbytes = result
        elif isinstance(result, Partial):
            nbytes = result.bytes if type(result.bytes) is int else None
            try:
                failed = sorted(result.failed.items())
                if failed and not (
                    all(type(index) is int for index, _ in failed)
                    and failed[0][0] >= 0
                    and failed[-1][0] < len(entries)
                    and all(isinstance(exc, BaseException) for _, exc in failed)
                ):
                    raise ValueError("not {index: exception} for this batch")
            except Exception as exc:
                bad = TypeError(
                    f"the sink returned a Partial whose failed= is wrong: {exc}"
                    f" ({len(entries)} items: indexes 0 to {len(entries) - 1})"
                )
                return [(entry, bad) for entry in entries]
            if failed:
                rejected = dict(failed)
                failures = [(entries[index], exc) for index, exc in failed]
                entries = [e for i, e in enumerate(entries) if i not in rejected]
        if nbytes is not None:
            self._bytes += nbytes
            flush.bytes = (flush.bytes or 0) + nbytes
        self._written_entries(entries)
        return failures

    def _written_entries(self, entries: list[Entry]) -> None:
        self._written += len(entries)
        self._succeeded += len(entries)
        ids = []
        for entry in entries:
            if entry.id is not None:
                ids.append(entry.id)
            self._done(entry)
        if ids:
            for released in self._graph.written(ids):
                self._buffer(released)

    def _flush_done(self, flush: Flush) -> None:
        keystate = flush.keystate
        keystate.flushing = False
        self._running.discard(flush)
        if flush.failed:
            self._failed_flushes += 1
        else:
            self._flushes += 1
        if self._on_flush is not None:
            now = self._clock()
            report = FlushReport(
                keystate.key,
                flush.size,
                flush.attempts,
                flush.start,
                now - flush.start,
                flush.bytes,
                flush.error,
                flush.failed,
            )
            self._call_hook(self._on_flush, report)
        buffer = keystate.buffer
        if buffer and not self._aborting:
            urgent = self._urgent
            if len(buffer) >= self._batch_size or (
                urgent and any(entry.seq <= urgent for entry in buffer)
            ):
                self._make_ready(keystate)
            else:
                self._arm(keystate)
        else:
            self._forget_key(keystate)
        self._pump()
        self._check_drained()

    # ------------------------------------------------------------- outcomes

    def _done(self, entry: Entry) -> None:
        """An entry reached its outcome: wake its caller, free its room."""
        entry.state = DONE
        self._count -= 1
        if entry.waiter is not None:
            entry.waiter.set()
        self._room.release(1)
        for wait in self._flush_waits:
            if entry.seq <= wait.mark:
                wait.remaining -= 1
                if wait.remaining == 0:
                    wait.event.set()
        if self._drained is not None and not self._count:
            self._check_drained()

    def _fail(
        self,
        flush: Flush,
        failures: list[tuple[Entry, BaseException]],
        *,
        whole: bool,
    ) -> None:
        """These entries of a flush failed for good (each with its exception)."""
        key = flush.keystate.key
        size = len(flush.entries)
        position = {id(entry): i for i, entry in enumerate(flush.entries)}
        flush.failed += len(failures)
        for entry, exc in failures:
            if whole:
                message = (
                    f"flushing {size} items to key {key!r} failed after"
                    f" {entry.attempts} attempt(s)"
                )
            else:
                message = (
                    f"the sink rejected item {position.get(id(entry), 0)} of"
                    f" {size} for key {key!r}, after {entry.attempts} attempt(s)"
                )
            entry.failure = (
                WriteError,
                (key, message),
                {"attempts": entry.attempts},
                exc,
            )
        self._settle_failed(failures, count_as="failed")

    def _interrupted(self, flush: Flush, entries: list[Entry]) -> None:
        """`close_timeout` cut a sink call short: its items may have landed."""
        key = flush.keystate.key
        message = (
            f"the sink call writing {len(entries)} items to key {key!r} was cut"
            " short by close_timeout; they may have been written"
        )
        error = WriteError(key, message, may_have_landed=True)
        kwargs = {"may_have_landed": True}
        for entry in entries:
            error_kwargs = {**kwargs, "attempts": entry.attempts}
            entry.failure = (WriteError, (key, message), error_kwargs, None)
        flush.failed += len(entries)
        self._settle_failed([(entry, error) for entry in entries], count_as="failed")

    def _settle_failed(
        self, failures: list[tuple[Entry, BaseException]], *, count_as: str
    ) -> None:
        """Record, report and finish entries that will not be written, then
        fail what waited for their ids."""
        if count_as == "failed":
            self._failed_items += len(failures)
        else:
            self._dropped += len(failures)
            for wait in self._flush_waits:  # they will raise: items were dropped
                if any(entry.seq <= wait.mark for entry, _ in failures):
                    wait.dropped = True
        reasons: list[tuple[Hashable, str]] = []
        for entry, exc in failures:
            self._record(entry, exc)
            if entry.id is not None:
                reasons.append((entry.id, _reason(exc)))
        # on_error: one call per run of items sharing a key and an exception
        group: list[Any] = []
        for i, (entry, exc) in enumerate(failures):
            group.append(entry.item)
            following = failures[i + 1] if i + 1 < len(failures) else None
            if (
                following is None
                or following[1] is not exc
                or following[0].key != entry.key
            ):
                if self._on_error is not None:
                    self._call_hook(self._on_error, entry.key, group, exc)
                group = []
        for entry, _ in failures:
            self._done(entry)
        if reasons:
            self._doom(self._graph.failed(reasons), report=True)

    def _doom(self, doomed: list[Doomed], *, report: bool) -> None:
        """Entries fail because an id they waited for was not written."""
        for entry, dependency, reason in doomed:
            message = dependency_message(entry.id, dependency, reason)
            entry.failure = (
                DependencyFailed,
                (entry.key, message, dependency),
                {},
                None,
            )
            if report:
                self._report_doomed(entry)

    def _report_doomed(self, entry: Entry) -> None:
        assert entry.failure is not None
        cls, args, kwargs, _ = entry.failure
        error = cls(*args, **kwargs)
        self._failed_items += 1
        self._record(entry, error)
        if self._on_error is not None:
            self._call_hook(self._on_error, entry.key, [entry.item], error)
        self._done(entry)

    def _report_doomed_now(self, entry: Entry) -> None:
        # An item failed at its write (an id it names failed already).
        if entry.state != DONE:
            self._report_doomed(entry)

    def _record(self, entry: Entry, error: BaseException) -> None:
        failures = self._failures
        if failures.maxlen is not None and len(failures) >= failures.maxlen:
            self._omitted += 1
        failures.append(
            FailedItem(entry.item, entry.key, entry.id, error, entry.attempts)
        )

    def _withdraw(self, entry: Entry) -> None:
        """A write_sync caller was cancelled before its item entered a flush."""
        if entry.state == BUFFERED:
            keystate = self._keys.get(entry.key)
            if keystate is not None:
                keystate.buffer.remove(entry)
                self._forget_key(keystate)
        doomed = self._graph.withdraw(
            entry, "was withdrawn (its write_sync was cancelled)"
        )
        self._withdrawn += 1
        entry.waiter = None
        self._done(entry)
        self._doom(doomed, report=True)

    # ------------------------------------------------------------- closing

    async def _close(self, flush: bool) -> list[FailedItem]:
        """Close gracefully: refuse new items, flush (or drop) the rest, wait.

        Cancellation: the caller tears the writer down (`_abort`).
        """
        self._state = CLOSING
        self._room.release_all()  # waiters see CLOSING and are refused
        self._start_close_clock()
        self._drained = self._new_event()
        dropped: list[FailedItem] = []
        if flush:
            self._urgent = self._seq
            for keystate in list(self._keys.values()):
                if keystate.buffer and not keystate.flushing and not keystate.queued:
                    self._make_ready(keystate)
        else:
            dropped = self._drop_everything("aclose(flush=False) dropped it")
        self._check_drained()
        with anyio.move_on_at(self._close_deadline):
            await self._drained.wait()
        if not self._drained.is_set():  # close_timeout passed
            self._abort("the writer's close_timeout passed before it was written")
            await self._drained.wait()  # the flushes end at once, cut short
        self._stop()
        return dropped

    def _start_close_clock(self) -> None:
        if self._close_timeout is None or self._close_deadline < math.inf:
            return
        self._close_deadline = self._clock() + self._close_timeout

    def _check_drained(self) -> None:
        drained = self._drained
        if drained is not None and not self._count and not self._running:
            drained.set()

    def _abort(
        self, reason: str = "the writer was torn down before it was written"
    ) -> None:
        """Tear down: end retries, drop what no sink call holds; sink calls in
        progress finish (within `close_timeout`)."""
        if self._aborting:
            return
        self._aborting = True
        if self._state == RUNNING:
            self._state = CLOSING
        if self._drained is None:
            self._drained = self._new_event()
        self._room.release_all()
        self._start_close_clock()
        # What no sink call holds is dropped first; then the sink calls in
        # progress get the close deadline (past already if close_timeout is
        # what ended the close: they are cut short now), and a backoff or a
        # wait for a slot ends at once: no more retries.
        self._drop_everything(reason)
        deadline = self._scope_deadline = self._close_deadline
        for flush in self._running:
            scope = flush.scope
            if scope is None:
                continue
            if flush.in_sink:
                scope.deadline = min(scope.deadline, deadline)
            else:
                scope.cancel()
        if self._timer_wake is not None:
            self._timer_wake.set()
        self._check_drained()

    def _drop_everything(self, reason: str) -> list[FailedItem]:
        """Drop the buffered and held entries: reported, never written."""
        by_key: dict[Hashable, list[Entry]] = {}
        for keystate in list(self._keys.values()):
            if keystate.buffer:
                by_key.setdefault(keystate.key, []).extend(keystate.buffer)
            keystate.buffer = []
            keystate.due = None
            keystate.queued = False
            self._forget_key(keystate)
        self._ready.clear()
        for entry in self._graph.drop_held():
            by_key.setdefault(entry.key, []).append(entry)
        entries = []
        for group in by_key.values():  # per key, in acceptance order
            group.sort(key=_by_seq)
            entries.extend(group)
        self._graph.forget(entry.id for entry in entries if entry.id is not None)
        error = keybatch.ProcessorStopped(reason)
        for entry in entries:
            entry.failure = (keybatch.ProcessorStopped, (reason,), {}, None)
        self._settle_failed([(entry, error) for entry in entries], count_as="dropped")
        return [FailedItem(e.item, e.key, e.id, error, e.attempts) for e in entries]

    def _stop(self) -> None:
        """The end: nothing runs any more; whatever is left (nothing, after a
        close) is dropped."""
        if self._state == STOPPED:
            return
        if self._count:
            self._abort()
        self._state = STOPPED
        self._room.release_all()

    def _call_hook(self, hook: Callable[..., object], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:
            logger.exception("keybatch.writer: %s raised; ignored", hook)


def _not_open(*args: Any) -> None:
    raise RuntimeError("keybatch.writer: the writer is not open")


def _by_seq(entry: Entry) -> int:
    return entry.seq


def _reason(exc: BaseException) -> str:
    """Why an id was not written, as its dependents' messages say it."""
    if isinstance(exc, keybatch.ProcessorStopped):
        return "was dropped (the writer stopped)"
    if isinstance(exc, WriteError) and exc.may_have_landed:
        return "was cut short by close_timeout (it may have been written)"
    return f"failed to flush ({type(exc).__name__}: {exc})"
