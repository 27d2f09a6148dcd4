"""The trio backend: trio's own Event, clock and CancelScope, and callers parked
with trio's low-level scheduling.

A caller of `run` parks in `wait_task_rescheduled` and the worker reschedules it
with its own outcome (a value, or an error made for it), so the batch needs no
event and the caller no second look at its slot. Parking is where trio delivers
a pending cancellation: the abort callback withdraws the operation if it was
not applied yet, in the same step, before any other task runs.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Awaitable
from typing import Any, final

import trio
import trio.lowlevel

from .._model import SlotState
from .._pending import Pending, deliver
from . import foreign_loop_error
from ._asyncio import running_loop

__all__ = ["TrioBackend"]

QUEUED = SlotState.QUEUED
VALUE = SlotState.VALUE

_current_task = trio.lowlevel.current_task
_wait_task_rescheduled = trio.lowlevel.wait_task_rescheduled
_reschedule = trio.lowlevel.reschedule
_SUCCEEDED = trio.lowlevel.Abort.SUCCEEDED
_new = object.__new__

# trio.lowlevel.reschedule looks up the run's runner on every call.
_RUN_CONTEXT: Any = getattr(
    sys.modules.get("trio._core._run"), "GLOBAL_RUN_CONTEXT", None
)


def _runner_reschedule() -> Any:
    """The running trio runner's `reschedule`, looked up once per batch rather
    than once per caller; `trio.lowlevel.reschedule` if trio's internals moved."""
    try:
        return _RUN_CONTEXT.runner.reschedule
    except AttributeError:  # pragma: no cover - trio changed
        return _reschedule


@final
class _Parked:
    """A `run` caller parked in `wait_task_rescheduled`: its task, and its slot
    once accepted. One object per call serves three ends: its bound `abort` is
    the abort callback, and it is what the worker reschedules the task with:
    like an `outcome.Outcome`, `wait_task_rescheduled` calls its `unwrap()`,
    which returns the slot's value or raises the error made for this caller.
    (An `outcome.Value` alone costs five times as much to build.)"""

    __slots__ = ("task", "slot")

    task: Any
    slot: Pending[Any]

    def abort(self, _: object) -> Any:
        # Cancelled while parked: the worker must not reschedule it, and an
        # operation not applied yet is withdrawn now.
        slot = self.slot
        slot._waiter = None
        if slot._state is QUEUED:
            slot._batch.state.worker.engine.withdraw(slot)
        return _SUCCEEDED

    def unwrap(self) -> Any:
        slot = self.slot
        if slot._state is VALUE:
            return slot._outcome
        del self.slot  # no cycle through the traceback of what is raised
        return deliver(slot)


@final
class TrioBackend:
    __slots__ = ()

    name = "trio"
    cancelled = trio.Cancelled
    new_event = staticmethod(trio.Event)
    now = staticmethod(trio.current_time)
    checkpoint = staticmethod(trio.lowlevel.checkpoint)
    sweep = None  # a cancelled caller withdraws in its abort callback

    def __repr__(self) -> str:
        return "<TrioBackend>"

    @staticmethod
    def cancel_scope(
        *, deadline: float = math.inf, shield: bool = False
    ) -> trio.CancelScope:
        return trio.CancelScope(deadline=deadline, shield=shield)

    @staticmethod
    def own_cancellation() -> bool:
        return True  # trio's Cancelled is only ever raised at its own scopes

    @staticmethod
    def waiter(check: bool = True) -> _Parked | None:
        """The calling task's parking record, or None if `check` and the task
        is cancelled already."""
        task = _current_task()
        # trio's own test (what checkpoint_if_cancelled looks at), without the
        # coroutine that costs. If trio's internals moved, parking still
        # delivers the cancellation before the operation can be applied.
        try:
            if check and task._cancel_status.effectively_cancelled:
                return None
        except AttributeError:  # pragma: no cover - trio changed
            pass
        parked = _new(_Parked)
        parked.task = task
        return parked

    @staticmethod
    def park(slot: Pending[Any]) -> Awaitable[Any]:
        if running_loop() is not None:
            # asyncio.run() inside a trio task: parking would corrupt trio.
            raise foreign_loop_error()
        parked: _Parked = slot._waiter
        parked.slot = slot  # a cycle until woken or aborted (both clear _waiter)
        return _wait_task_rescheduled(parked.abort)

    @staticmethod
    def unpark(slot: Pending[Any], exc: BaseException) -> None:
        slot._waiter = None
        if slot._state is QUEUED:  # never applied: withdraw it
            slot._batch.state.worker.engine.withdraw(slot)

    @staticmethod
    def wake(slots: list[Pending[Any]]) -> None:
        """Give each parked caller of a finished batch its own outcome."""
        reschedule = _runner_reschedule()
        for slot in slots:
            parked = slot._waiter
            if parked is None:
                continue
            slot._waiter = None
            reschedule(parked.task, parked)

    async def wait_result(self, slot: Pending[Any]) -> None:
        if running_loop() is not None:
            raise foreign_loop_error()
        batch = slot._batch
        event = batch.state.worker.engine.batch_event(batch)
        await event.wait()  # trio's wait checkpoints when set
