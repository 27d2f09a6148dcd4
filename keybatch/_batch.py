"""One batch of one key: load, apply in order, save, deliver.

A key's state lives in its worker while the key has pending work or a batch in
flight, and is dropped as soon as it has neither. Operations are queued in
groups: a group is what one batch takes, and all its callers park on the group's
one event. Without ``max_ops`` a key has one group at a time (plus the next one
while a batch saves); with it, a group holds at most ``max_ops`` operations.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections import deque
from collections.abc import Hashable
from heapq import heappush
from typing import TYPE_CHECKING, Any

from ._errors import BatchError, LoadError, SaveError
from ._pending import (
    ABORTED,
    LOAD_FAILED,
    QUEUED,
    RAISED,
    SAVE_FAILED,
    VALUE,
    Pending,
)
from ._records import BatchReport

if TYPE_CHECKING:
    from ._worker import Worker

__all__ = ["Group", "KeyState", "close_batch", "should_close", "start_batch"]

logger = logging.getLogger("keybatch")

# Return types that are never awaitable: skips a failing hasattr (~0.3 us).
_PLAIN = frozenset({type(None), bool, int, float, str, bytes, tuple, list, dict})

# Key phases.
NEW = 0  # operations queued; waiting for the worker to load
LOADING = 1
OPEN = 2  # loaded; the window is open until close_at
SAVING = 3  # closed: applying and saving
GONE = 4  # dropped from its worker


class Group:
    """Operations one batch takes, and the event their callers park on."""

    __slots__ = ("state", "slots", "event", "live", "finished", "urgent")

    def __init__(self, state: KeyState, event: Any) -> None:
        self.state = state
        self.slots: list[Pending[Any]] = []
        self.event = event
        self.live = 0  # slots not withdrawn
        self.finished = False
        self.urgent = False  # flush() asked: close the batch as soon as loaded

    def withdraw_one(self) -> None:
        self.live -= 1
        proc = self.state.worker.proc
        proc._pending -= 1
        proc._withdrawn += 1
        if proc._room:
            proc._room.wake(1)
        st = self.state
        if self.live == 0 and st.phase == OPEN and st.groups[0] is self:
            st.worker.schedule(st)  # nobody left in the open batch: close it now


class KeyState:
    """A key's queued groups and its batch in flight, owned by one worker."""

    __slots__ = (
        "key",
        "worker",
        "groups",
        "phase",
        "start",
        "deadline",
        "resource",
        "in_ready",
        "batch_no",
        "load_duration",
        "closing",
        "close_at",
    )

    def __init__(self, key: Hashable, worker: Worker, start: float) -> None:
        self.key = key
        self.worker = worker
        self.groups: deque[Group] = deque()
        self.phase = NEW
        self.start = start
        self.deadline = math.inf
        self.resource: Any = None
        self.in_ready = False
        self.batch_no = 0
        self.load_duration = 0.0
        self.closing: Group | None = None  # the group being applied and saved
        self.close_at = math.inf  # when the open window ends


def _timeout(key: Hashable, what: str, seconds: float | None) -> TimeoutError:
    return TimeoutError(
        f"{what} of key {key!r} passed the batch deadline (max_duration={seconds}s)"
    )


async def start_batch(worker: Worker, st: KeyState) -> None:
    """Load the resource of a NEW key, then close at once or open the window."""
    proc = worker.proc
    groups = st.groups
    while groups[0].live == 0:  # every caller of the group withdrew
        dead = groups.popleft()
        dead.finished = True
        dead.event.set()  # flush() may wait on it
        if not groups:
            worker.drop(st)
            return
    group = groups[0]
    st.phase = LOADING
    st.batch_no += 1
    proc._active += 1
    max_duration = proc._max_duration
    st.deadline = deadline = (
        math.inf if max_duration is None else st.start + max_duration
    )
    load = proc._load
    if load is not None:
        clock = proc._clock
        began = clock()
        failure: BaseException | None = None
        resource: Any = None
        if deadline == math.inf:
            try:
                resource = await load(st.key)
            except Exception as exc:
                failure = exc
        else:
            with proc._cancel_scope(deadline=deadline) as scope:
                try:
                    resource = await load(st.key)
                except Exception as exc:
                    failure = exc
            if scope.cancelled_caught and failure is None:
                failure = _timeout(st.key, "load", max_duration)
        st.load_duration = clock() - began
        if failure is not None:
            groups.popleft()
            _finish(worker, st, group, LOAD_FAILED, failure, 0, None)
            return
        st.resource = resource
    st.close_at = close_at = st.start + proc._min_duration
    if should_close(st):
        await close_batch(worker, st)
    else:
        st.phase = OPEN
        heappush(worker.timers, (close_at, next(worker.seq), st, st.batch_no))


def should_close(st: KeyState) -> bool:
    """Whether the key's loaded batch must close now rather than at close_at."""
    proc = st.worker.proc
    group = st.groups[0]
    max_ops = proc._max_ops
    return (
        proc._stopping
        or group.urgent
        or group.live == 0
        or (max_ops is not None and len(group.slots) >= max_ops)
        or st.close_at <= proc._clock()
    )


async def close_batch(worker: Worker, st: KeyState) -> None:
    """Apply the batch's operations in arrival order, save once, deliver."""
    proc = worker.proc
    group = st.closing = st.groups.popleft()
    st.phase = SAVING
    resource = st.resource
    st.resource = None
    applied = failed = 0
    for slot in group.slots:
        if slot._state != QUEUED:
            continue
        try:
            value = slot._op(resource, *slot._args, **slot._kwargs)  # type: ignore[misc]
        except BaseException as exc:
            slot._outcome = exc
            slot._state = RAISED
            failed += 1
            continue
        kind = type(value)
        if kind not in _PLAIN and hasattr(kind, "__await__"):
            slot._outcome = _awaitable_returned(st.key, value)
            slot._state = RAISED
            failed += 1
            continue
        slot._outcome = value
        slot._state = VALUE
        applied += 1
    save = proc._save
    save_error: BaseException | None = None
    escaping: BaseException | None = None
    save_duration: float | None = None
    if applied and save is not None:
        clock = proc._clock
        began = clock()
        # Shielded: an outer cancellation must not lose applied work. Still
        # bounded by the batch deadline.
        with proc._cancel_scope(deadline=st.deadline, shield=True) as scope:
            try:
                await save(st.key, resource)
            except Exception as exc:
                save_error = exc
            except proc._cancelled:
                raise  # the deadline: caught by the scope just above
            except BaseException as exc:  # KeyboardInterrupt and the like
                save_error = escaping = exc
        if scope.cancelled_caught and save_error is None:
            save_error = _timeout(st.key, "save", proc._max_duration)
        save_duration = clock() - began
    if save_error is not None:
        for slot in group.slots:
            if slot._state == VALUE:
                slot._state = SAVE_FAILED
                slot._outcome = save_error
    _finish(worker, st, group, SAVE_FAILED, save_error, failed, save_duration)
    if escaping is not None:
        raise escaping


def _awaitable_returned(key: Hashable, value: Any) -> TypeError:
    if inspect.iscoroutine(value):
        value.close()  # no "never awaited" warning; its body never ran
    return TypeError(
        f"the operation on key {key!r} returned an awaitable"
        f" ({type(value).__name__}); operations must be plain functions"
    )


def _finish(
    worker: Worker,
    st: KeyState,
    group: Group,
    fail_state: int,
    failure: BaseException | None,
    op_failures: int,
    save_duration: float | None,
) -> None:
    proc = worker.proc
    started = st.start
    if failure is not None and fail_state == LOAD_FAILED:
        for slot in group.slots:
            if slot._state == QUEUED:
                slot._state = LOAD_FAILED
                slot._outcome = failure
    group.finished = True
    group.event.set()
    # Slots point at their group; a finished group lets go of its slots so that
    # neither forms a cycle: both are freed by refcounting, not by the GC.
    group.slots.clear()
    st.closing = None
    done = group.live
    proc._pending -= done
    proc._done += done
    proc._batches += 1
    proc._active -= 1
    proc._op_failures += op_failures
    if failure is not None:
        if fail_state == LOAD_FAILED:
            proc._load_failures += 1
        else:
            proc._save_failures += 1
    if proc._room:
        proc._room.wake(done)
    if st.groups:
        st.phase = NEW
        st.start = proc._clock()
        worker.schedule(st)
    else:
        worker.drop(st)
    hook = proc._on_batch
    if hook is not None:
        error: BatchError | None = None
        if failure is not None:
            cls = LoadError if fail_state == LOAD_FAILED else SaveError
            what = "load" if fail_state == LOAD_FAILED else "save"
            error = cls(st.key, f"{what} of key {st.key!r} failed")
            error.__cause__ = failure
        report = BatchReport(
            key=st.key,
            worker=worker.index,
            start=started,
            operations=done,
            load_duration=st.load_duration,
            save_duration=save_duration,
            error=error,
        )
        try:
            hook(report)
        except Exception:
            logger.exception("keybatch: on_batch hook raised; ignored")


def abort_group(group: Group) -> int:
    """Fail every queued slot of a group whose batch will never run."""
    n = 0
    for slot in group.slots:
        if slot._state == QUEUED:
            slot._state = ABORTED
            n += 1
    group.finished = True
    group.event.set()
    group.slots.clear()
    return n
