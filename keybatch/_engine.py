"""The engine: workers, the batch lifecycle, admission and stopping.

Given the options, the counters and a backend, never the `Processor`. The facade
validates and routes a call, then asks the engine to accept it; from there the
engine owns every state change of keys, batches, slots and sections, and the
backend parks the caller.

One batch, in order: start (the key's head of queue is a live batch) -> load
under the deadline `start + max_duration` -> the window stays open until
`start + min_duration` (or `max_ops`, `flush`, stop) -> apply every queued
operation in call order, each in a copy of its caller's context -> save,
shielded, under the same deadline (on `Conflict`: load and apply again, up to
`max_replays` times) -> wake each parked caller with its own outcome (and set
the batch's event, if `flush` or `Pending.result` made one) ->
report -> the key's next batch, or drop the key.

Ending, by any path: first stop admitting (new calls and callers waiting for
room get `ProcessorStopped`), then finish (graceful) or fail (teardown) every
accepted operation. No slot is ever accepted into a worker that is gone.
"""

from __future__ import annotations

import enum
import inspect
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from contextvars import Context
from heapq import heappop, heappush
from typing import Any

from ._admission import Admission
from ._backends import Backend
from ._errors import BatchError, Conflict, LoadError, SaveError
from ._model import (
    Batch,
    CloseReason,
    Counters,
    KeyPhase,
    KeyState,
    Options,
    SaveFailure,
    Section,
    SlotState,
)
from ._pending import Pending
from ._records import BatchReport

__all__ = ["Engine", "EngineState", "Worker"]

logger = logging.getLogger("keybatch")
_DEBUG = logging.DEBUG

QUEUED = SlotState.QUEUED
VALUE = SlotState.VALUE
RAISED = SlotState.RAISED
NEW = KeyPhase.NEW
LOADING = KeyPhase.LOADING
OPEN = KeyPhase.OPEN
SAVING = KeyPhase.SAVING
HELD = KeyPhase.HELD
GONE = KeyPhase.GONE

# Batches a busy worker runs back to back before it checkpoints.
_YIELD_EVERY = 64
# Return types that are never awaitable: skips a failing hasattr.
_PLAIN = frozenset({type(None), bool, int, float, str, bytes, tuple, list, dict})
_new_slot = object.__new__


class EngineState(enum.Enum):
    RUNNING = "running"
    STOPPING = "stopping"  # graceful: finish what was accepted
    ABORTING = "aborting"  # teardown: fail what was not applied


RUNNING = EngineState.RUNNING
ABORTING = EngineState.ABORTING


class Worker:
    """One worker task's state: the keys it owns, the ones ready, its timers."""

    __slots__ = (
        "engine",
        "index",
        "keys",
        "ready",
        "timers",
        "seq",
        "wakeup",
        "scope",
        "saving",
        "queued",
    )

    def __init__(self, engine: Engine, index: int) -> None:
        self.engine = engine
        self.index = index
        self.keys: dict[Hashable, KeyState] = {}
        self.ready: deque[KeyState] = deque()  # keys to start, or to close early
        # (close_at, tie-breaker, key state, batch number); stale ones are skipped
        self.timers: list[tuple[float, int, KeyState, int]] = []
        self.seq = itertools.count()
        self.wakeup: Any = None  # the event the worker sleeps on, or None
        # The worker runs in a shielded scope of its own, so an outer cancellation
        # never interrupts a save; teardown cancels this scope instead, unless
        # the worker is saving (the stop then takes effect after the save).
        self.scope: Any = None
        self.saving = False
        self.queued = 0  # operations accepted and not applied (max_worker_queue)

    def __repr__(self) -> str:
        return (
            f"<Worker {self.index} keys={len(self.keys)} ready={len(self.ready)}"
            f" timers={len(self.timers)} sleeping={self.wakeup is not None}>"
        )

    def schedule(self, st: KeyState) -> None:
        """Put a key on the ready queue (once) and wake the worker."""
        if not st.in_ready:
            st.in_ready = True
            self.ready.append(st)
            wakeup = self.wakeup
            if wakeup is not None:
                self.wakeup = None
                wakeup.set()

    def wake(self) -> None:
        wakeup = self.wakeup
        if wakeup is not None:
            self.wakeup = None
            wakeup.set()


class Engine:
    """Owns the workers and every state change; see the module docstring."""

    __slots__ = (
        "options",
        "counters",
        "backend",
        "workers",
        "admission",
        "state",
        "running",
        "all_stopped",
        "new_event",
        "clock",
        "timed",
        "wake",
        "sweep",
        "debug",
        "close_at_once",
    )

    def __init__(self, options: Options, backend: Backend) -> None:
        self.options = options
        self.counters = Counters()
        self.backend = backend
        self.workers = [Worker(self, i) for i in range(options.workers)]
        self.admission = Admission()
        self.state = RUNNING
        self.running = 0
        self.all_stopped = backend.new_event()
        self.new_event = backend.new_event
        self.clock = backend.now
        self.timed = options.timed
        self.wake = backend.wake
        self.sweep = backend.sweep
        self.debug = logger.isEnabledFor(_DEBUG)
        # A loaded batch closes at once unless a window or max_ops says otherwise.
        self.close_at_once = options.min_duration == 0 and options.max_ops is None

    def __repr__(self) -> str:
        return (
            f"<Engine {self.state.value} workers={len(self.workers)}"
            f" running={self.running} {self.counters!r}>"
        )

    # -- accepting ---------------------------------------------------------

    def accept(
        self,
        worker: Worker,
        key: Hashable,
        op: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        ctx: Context,
        waiter: Any,
    ) -> Pending[Any]:
        """Queue one operation on its key's tail batch (the hot path).

        `waiter` is what its `run` caller parks on (from the backend), or None
        (`submit`, or a caller admitted from the queue that parks later)."""
        st = worker.keys.get(key)
        if st is None:  # a new key: its first batch, and the worker has work
            st = self._add_key(worker, key)
            batch = st.tail = Batch(st)
            st.queue.append(batch)
            worker.schedule(st)
        else:
            batch = st.tail or self._new_tail(st)
        slot: Pending[Any] = _new_slot(Pending)
        slot._op = op
        slot._args = args
        slot._kwargs = kwargs if args or kwargs else None
        slot._ctx = ctx
        slot._state = QUEUED
        slot._outcome = None
        slot._batch = batch
        slot._waiter = waiter
        slots = batch.slots
        slots.append(slot)
        batch.live += 1
        worker.queued += 1
        self.counters.accepted()
        max_ops = self.options.max_ops
        if max_ops is not None and len(slots) >= max_ops:
            st.tail = None  # full: the next operation starts a new batch
            if st.phase is OPEN and st.queue[0] is batch:
                worker.schedule(st)  # the open batch is full: close it now
        return slot

    def _add_key(self, worker: Worker, key: Hashable) -> KeyState:
        """A key gets state in its worker: it has work or a section now."""
        st = KeyState(key, worker, 0.0)
        if self.timed:
            self._restart(st)
        worker.keys[key] = st
        return st

    def _new_tail(self, st: KeyState) -> Batch:
        """A new batch at the end of the key's queue takes the next operations."""
        batch = st.tail = Batch(st)
        st.queue.append(batch)
        return batch

    def withdraw(self, slot: Pending[Any]) -> None:
        """A cancelled caller takes back its operation, not applied yet."""
        slot._state = SlotState.WITHDRAWN
        slot._op = None
        slot._args = ()
        slot._kwargs = None
        slot._ctx = None
        batch = slot._batch
        batch.live -= 1
        batch.withdrawn += 1
        self.counters.withdrawn_one()
        st = batch.state
        st.worker.queued -= 1
        if batch.live == 0 and st.phase is OPEN and st.queue[0] is batch:
            st.worker.schedule(st)  # nobody left in the open batch: close it now
        if self.admission.waiting:
            self.serve_admission()

    def serve_admission(self) -> None:
        """Admit callers waiting for room, first come first served, while room."""
        limit = self.options.max_pending
        assert limit is not None
        admission = self.admission
        counters = self.counters
        while admission.waiting:
            head = admission.peek()
            if head.section is None and counters.pending >= limit:
                break
            waiter = admission.pop()
            if self.state is not RUNNING:  # pragma: no cover - failed at stop
                waiter.refuse()
                continue
            if waiter.section is not None:
                # A section's turn: every call before it was admitted.
                waiter.slot = self.open_section(waiter.section)
                waiter.event.set()
                continue
            waiter.slot = self.accept(
                waiter.worker,
                waiter.key,
                waiter.op,
                waiter.args,
                waiter.kwargs,
                waiter.ctx,
                None,
            )
            waiter.event.set()

    # -- stopping ----------------------------------------------------------

    def begin_stop(self, abort: bool) -> None:
        """Stop admitting; then close open windows (graceful) or let the workers
        fail what was not applied as they are cancelled (teardown)."""
        if abort:
            self.state = ABORTING
        elif self.state is RUNNING:
            self.state = EngineState.STOPPING
        else:
            return
        self.admission.refuse_all()
        for worker in self.workers:
            if abort and worker.scope is not None and not worker.saving:
                worker.scope.cancel()
            for st in worker.keys.values():
                if st.phase is OPEN:
                    worker.schedule(st)
            worker.wake()

    def _abort_worker(self, worker: Worker) -> None:
        # The worker is torn down (cancelled, or a load/save/hook raised a
        # BaseException): first stop admitting, then fail every operation not
        # applied yet with ProcessorStopped; the worker keeps nothing.
        self.begin_stop(abort=True)
        counters = self.counters
        for st in list(worker.keys.values()):
            failed = 0
            for entry in st.queue:
                if type(entry) is Batch:
                    n = self._abort_batch(entry)
                    failed += n
                    worker.queued -= n
                else:
                    _fail_section(entry)  # type: ignore[arg-type]
            st.queue.clear()
            st.tail = None
            counters.aborted(failed, st.phase in (LOADING, OPEN, SAVING))
            self._drop(worker, st)
        worker.ready.clear()
        worker.timers.clear()
        if self.admission.waiting:  # pragma: no cover - refused at stop
            self.admission.refuse_all()

    def _restart(self, st: KeyState) -> None:
        """The key's next batch starts now (both clocks)."""
        if self.timed:
            st.start = self.clock()
            if self.options.on_batch is not None:
                st.wall_start = time.time()

    def _settle(self, batch: Batch) -> None:
        """The batch finished: wake its parked callers, each with its outcome."""
        batch.finished = True
        slots = batch.slots
        if slots:
            self.wake(slots)
            # Slots point at their batch; a finished batch lets go of its slots
            # so neither forms a cycle: both are freed by refcounting.
            slots.clear()
        event = batch.event
        if event is not None:
            event.set()

    def batch_event(self, batch: Batch) -> Any:
        """The event set when `batch` finished, made on first use."""
        event = batch.event
        if event is None:
            event = batch.event = self.new_event()
            if batch.finished:
                event.set()
        return event

    def _abort_batch(self, batch: Batch) -> int:
        """Fail every queued slot of a batch that will never run."""
        n = 0
        for slot in batch.slots:
            if slot._state is QUEUED:
                slot._state = SlotState.ABORTED
                n += 1
        self._settle(batch)
        return n

    def _drop(self, worker: Worker, st: KeyState) -> None:
        st.phase = GONE
        keys = worker.keys
        del keys[st.key]
        if not keys:
            # A dict never shrinks on deletion: after a burst of distinct keys
            # it would keep its large table for good. A fresh one gives it back.
            worker.keys = {}

    # -- the worker loop ---------------------------------------------------

    async def run_worker(self, worker: Worker) -> None:
        """One worker task. Returns once stopping and it owns no key."""
        try:
            with self.backend.cancel_scope(shield=True) as worker.scope:
                if self.state is ABORTING:
                    worker.scope.cancel()
                try:
                    await self._loop(worker)
                except self.backend.cancelled:
                    # Our own scope's cancellation (teardown; the scope absorbs
                    # it), or on asyncio a native task.cancel() of this task
                    # (asyncio.run's shutdown, "cancel all tasks"): either way the
                    # processor is torn down, and this task ends quietly rather
                    # than cancel the processor's owner through the task group.
                    self._abort_worker(worker)
                except BaseException:
                    self._abort_worker(worker)
                    raise
        finally:
            worker.scope = None
            self.running -= 1
            if self.running == 0:
                self.all_stopped.set()

    async def _loop(self, worker: Worker) -> None:
        ready = worker.ready
        timers = worker.timers
        clock = self.clock
        since_yield = 0
        while True:
            if self.state is ABORTING:
                self._abort_worker(worker)
                return
            if timers:  # due windows join the ready queue, in FIFO order
                now = clock()
                while timers and timers[0][0] <= now:
                    _, _, st, batch_no = heappop(timers)
                    if st.phase is OPEN and st.batch_no == batch_no:
                        worker.schedule(st)
            if ready:
                st = ready.popleft()
                st.in_ready = False
                phase = st.phase
                if phase is NEW:  # start: reach a section, or load the batch
                    batch = self._begin(worker, st)
                    if batch is not None:
                        await self._load(st)
                        if (
                            st.failure is None
                            and self.close_at_once
                            and self.state is RUNNING
                            and not batch.urgent
                        ):
                            reason: CloseReason | None = CloseReason.WINDOW
                        else:
                            reason = self._loaded(worker, st, batch)
                        batch = None  # the loop keeps no finished batch alive
                        if reason is not None:
                            await self._close(worker, st, reason)
                elif phase is OPEN:
                    reason = self._close_reason(st)
                    if reason is not None:
                        await self._close(worker, st, reason)
                since_yield += 1
                if since_yield >= _YIELD_EVERY:
                    # In-memory loads and saves never yield: let others run.
                    since_yield = 0
                    await self.backend.checkpoint()
                continue
            if self.state is not RUNNING and not worker.keys:
                return
            since_yield = 0
            await self._sleep(worker, timers[0][0] if timers else math.inf)
            # One look per wake-up, not one per batch (logging.Logger caches
            # levels, but the call still costs as much as a small batch step).
            self.debug = logger.isEnabledFor(_DEBUG)

    async def _sleep(self, worker: Worker, deadline: float) -> None:
        wakeup = worker.wakeup = self.new_event()
        try:
            if deadline == math.inf:
                await wakeup.wait()
            else:
                with self.backend.cancel_scope(deadline=deadline):
                    await wakeup.wait()
        finally:
            worker.wakeup = None

    def _close_reason(self, st: KeyState) -> CloseReason | None:
        """Why the key's loaded batch must close now, or None to keep it open."""
        batch: Batch = st.queue[0]  # type: ignore[assignment]
        if self.state is not RUNNING:
            return CloseReason.STOP
        if batch.urgent:
            return CloseReason.FLUSH
        max_ops = self.options.max_ops
        if max_ops is not None and len(batch.slots) >= max_ops:
            return CloseReason.MAX_OPS
        if batch.live == 0 or st.close_at <= self.clock():
            return CloseReason.WINDOW
        return None

    # -- one batch ---------------------------------------------------------

    def _begin(self, worker: Worker, st: KeyState) -> Batch | None:
        """The key's head of queue starts: a section is reached (None), an
        empty queue drops the key (None), or its batch is loading (returned)."""
        queue = st.queue
        while True:
            if not queue:
                self._drop(worker, st)
                return None
            head = queue[0]
            if type(head) is Section:
                st.phase = HELD
                _reach(head, self.counters)
                return None
            if head.live:  # type: ignore[union-attr]
                break
            # Every caller of this batch withdrew: it never runs.
            del queue[0]
            if st.tail is head:
                st.tail = None
            self._settle(head)  # type: ignore[arg-type]  # flush() may wait on it
        batch: Batch = head  # type: ignore[assignment]
        options = self.options
        st.phase = LOADING
        st.batch_no += 1
        self.counters.batch_started()
        if self.timed:
            max_duration = options.max_duration
            st.deadline = math.inf if max_duration is None else st.start + max_duration
            st.close_at = st.start + options.min_duration
        return batch

    def _loaded(self, worker: Worker, st: KeyState, batch: Batch) -> CloseReason | None:
        """The batch's load ended: on failure its callers get it (None);
        otherwise why it closes now, or None with its window open. (`_loop`
        takes the common case, a batch with no window, without this call.)"""
        if st.failure is not None:
            del st.queue[0]
            if st.tail is batch:
                st.tail = None
            worker.queued -= batch.live
            _fail_slots(batch, QUEUED, SlotState.LOAD_FAILED, st.failure)
            self._finish(worker, st, batch, None, 0, None, st.failure, None, 0)
            st.failure = None
            return None
        reason = self._close_reason(st)
        if reason is None and self.options.min_duration == 0:
            reason = CloseReason.WINDOW
        if reason is None:
            st.phase = OPEN
            heappush(worker.timers, (st.close_at, next(worker.seq), st, st.batch_no))
        return reason

    async def _load(self, st: KeyState) -> None:
        """Load the key's resource into `st.resource`, or its failure into
        `st.failure`.

        Failures travel on the key state, never in a local variable: on Python
        3.12+ a failure's traceback keeps every frame of the await chain alive
        with its locals, so a frame that held the failure would make a cycle.
        """
        load = self.options.load
        if load is None:
            st.resource = st.failure = None
            return
        timed = self.timed
        began = self.clock() if timed else 0.0
        backend = self.backend
        deadline = st.deadline
        st.resource = st.failure = None
        try:
            if deadline == math.inf:
                st.resource = await load(st.key)
            else:
                with backend.cancel_scope(deadline=deadline) as scope:
                    st.resource = await load(st.key)
                if scope.cancelled_caught:
                    st.failure = _timeout(st.key, "load", self.options.max_duration)
        except BaseException as exc:
            if not self._is_failure(exc):
                raise
            st.failure = exc
        if timed:
            st.load_duration = self.clock() - began

    async def _close(self, worker: Worker, st: KeyState, reason: CloseReason) -> None:
        """Apply the batch in call order, save once (replaying on Conflict),
        deliver every outcome. Failures travel on `st.failure` (see `_load`)."""
        batch: Batch = st.queue[0]  # type: ignore[assignment]
        if self.sweep is not None:
            # asyncio: a caller cancelled while parked withdraws now, even if
            # it has not run since its future was cancelled.
            self.sweep(batch.slots, self.withdraw)
        del st.queue[0]
        if st.tail is batch:
            st.tail = None
        st.closing = batch
        st.phase = SAVING
        worker.queued -= batch.live
        options = self.options
        resource = st.resource
        st.resource = None
        applied, failed = _apply(batch.slots, resource, QUEUED)
        save = options.save
        save_duration: float | None = None
        replays = 0
        timed = self.timed
        if applied and save is not None:
            began = self.clock() if timed else 0.0
            backend = self.backend
            while True:
                # Save, shielded from teardown (the worker's own scope) and
                # under the batch deadline (inline: one coroutine less per
                # batch). It ends saved, or with a Conflict in st.failure (a
                # replay), or with a SaveFailure in st.failure. A BaseException
                # that is not a failure (a KeyboardInterrupt, a native
                # cancellation on asyncio) reaches the batch's callers as a
                # SaveError first, then propagates.
                deadline = st.deadline
                late = False
                worker.saving = True
                st.failure = None
                try:
                    try:
                        if deadline == math.inf:
                            await save(st.key, resource)
                        else:
                            with backend.cancel_scope(deadline=deadline) as scope:
                                await save(st.key, resource)
                            late = scope.cancelled_caught
                    except BaseException as exc:
                        if not self._is_failure(exc):
                            raise
                        st.failure = exc
                except BaseException as exc:
                    self._save_cut_short(st, batch, reason, failed, began, replays, exc)
                    raise
                finally:
                    worker.saving = False
                if st.failure is None:
                    if not late:
                        break  # saved
                    st.failure = _timeout(st.key, "save", options.max_duration)
                if not isinstance(st.failure, Conflict):
                    st.failure = SaveFailure(st.failure, True)
                    break
                self.counters.conflict()
                if replays >= options.max_replays or self.state is ABORTING:
                    st.failure = SaveFailure(st.failure, False)
                    break
                # Another writer saved first: load again, apply the same
                # operations again in the same order, save again.
                replays += 1
                st.conflict = st.failure
                try:
                    await self._load(st)
                except BaseException:
                    # Torn down (or a BaseException) during the reload: nothing
                    # was stored (the save raised Conflict); say so, then go.
                    conflict, st.conflict = st.conflict, None
                    self._save_cut_short(
                        st, batch, reason, failed, began, replays, conflict, False
                    )
                    del conflict
                    raise
                st.conflict = None
                if st.failure is not None:
                    _fail_slots(batch, VALUE, SlotState.LOAD_FAILED, st.failure)
                    _fail_slots(batch, RAISED, SlotState.LOAD_FAILED, st.failure)
                    self._finish(
                        worker, st, batch, reason, 0,
                        self.clock() - began if timed else None,
                        st.failure, None, replays,
                    )  # fmt: skip
                    st.failure = None
                    return
                resource = st.resource
                st.resource = None
                applied, failed = _apply(batch.slots, resource, None)
                if not applied:
                    break
            if timed:
                save_duration = self.clock() - began
        if st.failure is not None:
            _fail_slots(batch, VALUE, SlotState.SAVE_FAILED, st.failure)
        self._finish(
            worker, st, batch, reason, failed, save_duration, None, st.failure,
            replays,
        )  # fmt: skip
        st.failure = None

    def _is_failure(self, exc: BaseException) -> bool:
        """Whether what `load` or `save` raised is a failure for the batch's
        callers: an Exception, or (asyncio) a CancelledError not aimed at the
        worker (something it awaited was cancelled by another task). The
        worker's own cancellation (teardown) and other BaseExceptions are not:
        they propagate."""
        if isinstance(exc, Exception):
            return True
        backend = self.backend
        return isinstance(exc, backend.cancelled) and not backend.own_cancellation()

    def _save_cut_short(
        self,
        st: KeyState,
        batch: Batch,
        reason: CloseReason,
        failed: int,
        began: float,
        replays: int,
        cause: BaseException,
        landed: bool = True,
    ) -> None:
        """A BaseException ends the save (or a replay's reload): the batch's
        callers get a SaveError first, then the caller re-raises."""
        st.failure = SaveFailure(cause, landed)
        _fail_slots(batch, VALUE, SlotState.SAVE_FAILED, st.failure)
        self._finish(
            st.worker, st, batch, reason, failed,
            self.clock() - began if self.timed else None,
            None, st.failure, replays,
        )  # fmt: skip
        st.failure = None

    def _finish(
        self,
        worker: Worker,
        st: KeyState,
        batch: Batch,
        reason: CloseReason | None,
        op_failures: int,
        save_duration: float | None,
        load_failure: BaseException | None,
        save_failure: SaveFailure | None,
        replays: int,
    ) -> None:
        """Deliver the batch's outcomes, count, move the key on, report."""
        self._settle(batch)
        st.closing = None
        delivered = batch.live
        self.counters.batch_finished(
            delivered, op_failures, load_failure is not None, save_failure is not None
        )
        if self.admission.waiting:
            self.serve_admission()
        started = st.start
        wall_start = st.wall_start
        if st.phase is not GONE:
            if st.queue:
                st.phase = NEW
                if self.timed:
                    self._restart(st)
                worker.schedule(st)
            else:
                self._drop(worker, st)
        if self.debug:
            logger.debug(
                "batch of key %r: %d ops, close=%s, load_failed=%s, save_failed=%s",
                st.key,
                delivered,
                None if reason is None else reason.value,
                load_failure is not None,
                save_failure is not None,
            )
        hook = self.options.on_batch
        if hook is None:
            return
        error: BatchError | None = None
        if load_failure is not None:
            error = LoadError(st.key, f"load of key {st.key!r} failed")
            error.__cause__ = load_failure
        elif save_failure is not None:
            error = SaveError(
                st.key,
                f"save of key {st.key!r} failed",
                may_have_landed=save_failure.may_have_landed,
            )
            error.__cause__ = save_failure.cause
        report = BatchReport(
            key=st.key,
            worker=worker.index,
            start=started,
            operations=delivered,
            load_duration=st.load_duration,
            save_duration=save_duration,
            error=error,
            close_reason=None if reason is None else reason.value,
            duration=self.clock() - started,
            failed_operations=op_failures,
            withdrawn_operations=batch.withdrawn,
            wall_start=wall_start,
            replays=replays,
        )
        del error
        _call_hook(hook, report, self.backend)

    # -- flush and sections ------------------------------------------------

    def flush_events(self) -> list[Any]:
        """Mark every queued batch urgent; return the events to wait for."""
        events = []
        for worker in self.workers:
            for st in worker.keys.values():
                if st.closing is not None:
                    events.append(self.batch_event(st.closing))
                for entry in st.queue:
                    if type(entry) is Batch:
                        entry.urgent = True
                        events.append(self.batch_event(entry))
                if st.phase is OPEN:
                    worker.schedule(st)
        return events

    def busy(self, worker: Worker, key: Hashable) -> bool:
        """A key is busy while it has queued work, a batch, or a section."""
        return key in worker.keys

    def open_section(self, keys: list[tuple[Worker, Hashable]]) -> Section:
        """Queue a section behind everything called before it on its keys."""
        section = Section(tuple(key for _, key in keys), self.new_event())
        for worker, key in keys:
            st = worker.keys.get(key)
            if st is None:
                st = self._add_key(worker, key)
                st.queue.append(section)
                st.phase = HELD
                section.states.append(st)
                _reach(section, self.counters)
            else:
                st.queue.append(section)
                st.tail = None  # operations called from now on go after it
                section.states.append(st)
        return section

    def release_section(self, section: Section) -> None:
        """End a section, held or still waiting; its keys move on."""
        if section.released:
            return
        section.released = True
        if section.held:
            section.held = False
            self.counters.section_released()
        for st in section.states:
            if st.phase is GONE:
                continue
            queue = st.queue
            at_head = bool(queue) and queue[0] is section
            try:
                queue.remove(section)
            except ValueError:  # pragma: no cover - aborted meanwhile
                continue
            if at_head and st.phase is HELD:
                if queue:
                    st.phase = NEW
                    self._restart(st)
                    st.worker.schedule(st)
                else:
                    self._drop(st.worker, st)
        section.states = []
        if self.state is not RUNNING:
            for worker in self.workers:
                worker.wake()


def _reach(section: Section, counters: Counters) -> None:
    section.reached += 1
    if section.reached == len(section.keys) and not section.released:
        section.held = True
        counters.section_held()
        section.event.set()


def _fail_section(section: Section) -> None:
    if not section.held and not section.released:
        section.failed = True
        section.event.set()


def _fail_slots(batch: Batch, state: SlotState, to: SlotState, outcome: Any) -> None:
    """Give every slot of the batch in `state` the failed state `to`."""
    for slot in batch.slots:
        if slot._state is state:
            slot._state = to
            slot._outcome = outcome


def _apply(slots: list[Pending[Any]], resource: Any, only: Any) -> tuple[int, int]:
    """Apply the slots in call order, each in its caller's context copy.

    `only=QUEUED` applies the queued slots (a first application); `only=None`
    applies again the ones applied before (a replay after a Conflict). Runs in a
    frame of its own that keeps no slot once it returns, so an exception that an
    operation raised holds no cycle through it.
    """
    applied = failed = 0
    slot: Any = None
    for slot in slots:
        state = slot._state
        if only is None:
            if state is not VALUE and state is not RAISED:
                continue
        elif state is not QUEUED:
            continue
        try:
            if slot._kwargs is None:  # no arguments: a cheaper call
                value = slot._ctx.run(slot._op, resource)
            else:
                value = slot._ctx.run(slot._op, resource, *slot._args, **slot._kwargs)
        except BaseException as exc:
            slot._outcome = exc
            slot._state = RAISED
            failed += 1
            continue
        kind = type(value)
        if kind not in _PLAIN and hasattr(kind, "__await__"):
            slot._outcome = _awaitable_returned(slot, value)
            slot._state = RAISED
            failed += 1
            continue
        slot._outcome = value
        slot._state = VALUE
        applied += 1
    slot = None
    return applied, failed


def _awaitable_returned(slot: Pending[Any], value: Any) -> TypeError:
    if inspect.iscoroutine(value):
        value.close()  # no "never awaited" warning; its body never ran
    key = slot._batch.state.key
    return TypeError(
        f"the operation on key {key!r} returned an awaitable"
        f" ({type(value).__name__}); operations must be plain functions"
    )


def _call_hook(
    hook: Callable[[Any], object], report: BatchReport, backend: Any
) -> None:
    try:
        hook(report)
    except Exception:
        logger.warning("keybatch: on_batch hook raised; ignored", exc_info=True)
    except backend.cancelled:
        if backend.own_cancellation():
            raise
        logger.warning(
            "keybatch: on_batch hook raised a cancellation not aimed at its"
            " worker; ignored",
            exc_info=True,
        )


def _timeout(key: Hashable, what: str, seconds: float | None) -> TimeoutError:
    return TimeoutError(
        f"{what} of key {key!r} passed the batch deadline (max_duration={seconds}s)"
    )
