"""The asyncio backend (also uvloop, and eager task factories).

Every use of a private asyncio detail in keybatch lives here, gated by Python
version, with a public-API fallback. Set `KEYBATCH_ASYNCIO_PUBLIC_ONLY=1` to force
the fallback (CI runs the suite once that way); Python 3.10 always uses it.

How callers park. Each caller of `run` awaits a future of its own, which the
worker resolves with that caller's outcome (a value, or an error made for it).
Cancelling a caller cancels only its own future, so a cancellation costs O(1)
whatever the batch's size. A future found cancelled when its batch closes is
withdrawn there and then, even if its caller has not run since: a cancellation
requested before the batch closed never lets the operation apply.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, final

import anyio
import anyio.lowlevel

from .._model import SlotState
from .._pending import Pending, outcome_error
from .._util import reraise
from . import foreign_loop_error

__all__ = ["PUBLIC_ONLY", "AsyncioBackend", "AsyncioEvent", "running_loop"]

QUEUED = SlotState.QUEUED
VALUE = SlotState.VALUE
RAISED = SlotState.RAISED

#: Public asyncio API only: no Task.cancelling() (3.11+), no private attributes.
PUBLIC_ONLY = sys.version_info < (3, 11) or os.environ.get(
    "KEYBATCH_ASYNCIO_PUBLIC_ONLY", ""
) not in ("", "0")


if PUBLIC_ONLY:

    def running_loop() -> asyncio.AbstractEventLoop | None:
        """The running asyncio loop of this thread, or None."""
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            return None

else:
    running_loop = asyncio._get_running_loop  # no exception when there is none

if PUBLIC_ONLY:
    _current_task: Any = asyncio.current_task
else:
    # asyncio.current_task is written in Python on 3.11; its table is not.
    _table = getattr(asyncio.tasks, "_current_tasks", None)
    if sys.version_info < (3, 12) and isinstance(_table, dict):
        _current_task = _table.get
    else:
        _current_task = asyncio.current_task


@final
class AsyncioEvent:
    """A one-shot event on asyncio: each waiter parks on a future of its own."""

    __slots__ = ("_loop", "_flag", "_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._flag = False
        self._waiters: set[asyncio.Future[None]] | None = None

    def __repr__(self) -> str:
        return f"<AsyncioEvent set={self._flag}>"

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if self._flag:
            return
        self._flag = True
        waiters = self._waiters
        if waiters:
            self._waiters = None
            for future in waiters:
                if not future.done():
                    future.set_result(None)

    async def wait(self) -> bool:
        """Wait until set.

        Cancellation: raised here; the event is unaffected. Like asyncio.Event,
        returns at once, without yielding, when the event is set already.
        """
        if self._flag:
            return True
        future = self._loop.create_future()
        if self._waiters is None:
            self._waiters = {future}
        else:
            self._waiters.add(future)
        try:
            await future
        except BaseException as exc:
            if _refused_by_foreign_loop(future):
                raise foreign_loop_error() from exc
            raise
        finally:
            if self._waiters is not None:
                self._waiters.discard(future)
        return True


def _refused_by_foreign_loop(future: asyncio.Future[Any]) -> bool:
    """Whether `future` was awaited by another event loop (trio.run() inside an
    asyncio task), which refused it; unblocks it for the others."""
    if not PUBLIC_ONLY and not future.done() and future._asyncio_future_blocking:
        future._asyncio_future_blocking = False
        return True
    return False


def _future_factory(loop: asyncio.AbstractEventLoop) -> Any:
    """`loop.create_future`, or the same without its Python frame when the
    loop does not override it (asyncio's own loops)."""
    if type(loop).create_future is asyncio.BaseEventLoop.create_future:
        return functools.partial(asyncio.Future, loop=loop)
    return loop.create_future


class _Handoff(Exception):
    """Raised through a caller's future in place of an error that a future
    cannot carry as it is: a BaseException that is not an Exception (the task
    would treat it as its own), or StopIteration. `unpark` raises the real one,
    kept on the slot, in the caller's frame."""


@final
class AsyncioBackend:
    __slots__ = ("_loop", "_scope_class", "_new_future")

    name = "asyncio"
    cancelled = asyncio.CancelledError

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._new_future = _future_factory(self._loop)
        # anyio.CancelScope(...) looks the backend up on every call; the class it
        # returns, called directly, builds the same scope at about half the cost.
        self._scope_class: Any = type(anyio.CancelScope())

    def __repr__(self) -> str:
        return f"<AsyncioBackend public_only={PUBLIC_ONLY}>"

    def now(self) -> float:
        return self._loop.time()

    def new_event(self) -> AsyncioEvent:
        return AsyncioEvent(self._loop)

    def waiter(self, check: bool = True) -> asyncio.Future[Any] | None:
        """A future for the calling task to park on, or None if `check` and a
        cancellation was already requested of it (native, or delivered by an
        anyio scope). An anyio scope that the task cancelled itself and has not
        delivered yet is not seen here (that would cost a walk of its scopes
        per call); its cancellation reaches the future before the worker runs,
        as a rule, and `sweep` withdraws a slot whose future was cancelled."""
        if check and not PUBLIC_ONLY:
            task = _current_task(self._loop)
            if task is not None and task.cancelling():
                return None
        future: asyncio.Future[Any] = self._new_future()
        return future

    @staticmethod
    def park(slot: Pending[Any]) -> Awaitable[Any]:
        return slot._waiter  # type: ignore[no-any-return]

    @staticmethod
    def unpark(slot: Pending[Any], exc: BaseException) -> None:
        future = slot._waiter
        slot._waiter = None
        if slot._state is QUEUED:  # never applied: withdraw it
            slot._batch.state.worker.engine.withdraw(slot)
        elif type(exc) is _Handoff:
            error, slot._outcome = slot._outcome, None
            try:
                reraise(error)
            finally:
                del error
        if future is not None and _refused_by_foreign_loop(future):
            raise foreign_loop_error()

    @staticmethod
    def sweep(slots: list[Any], withdraw: Callable[[Any], None]) -> None:
        """Withdraw the queued slots whose caller was cancelled (its future
        was), before the batch applies them."""
        for slot in slots:
            future = slot._waiter
            if future is not None and slot._state is QUEUED and future.cancelled():
                withdraw(slot)

    @staticmethod
    def wake(slots: list[Pending[Any]]) -> None:
        """Give each parked caller of a finished batch its own outcome."""
        for slot in slots:
            future = slot._waiter
            if future is None:
                continue
            slot._waiter = None
            if future.done():  # cancelled: the caller is gone
                continue
            if slot._state is VALUE:
                future.set_result(slot._outcome)
                continue
            error = outcome_error(slot)
            if isinstance(error, Exception) and not isinstance(error, StopIteration):
                if slot._state is RAISED:
                    slot._outcome = None  # the caller owns it from here on
                future.set_exception(error)
            else:
                slot._outcome = error  # unpark raises it in the caller's frame
                future.set_exception(_Handoff())
            del error

    async def checkpoint(self) -> None:
        await anyio.lowlevel.checkpoint()

    def cancel_scope(self, *, deadline: float = math.inf, shield: bool = False) -> Any:
        return self._scope_class(deadline=deadline, shield=shield)

    def own_cancellation(self) -> bool:
        if PUBLIC_ONLY:
            return True  # cannot tell: treat it as ours (documented)
        task = _current_task(self._loop)
        return task is None or task.cancelling() > 0

    async def wait_result(self, slot: Pending[Any]) -> None:
        batch = slot._batch
        event = batch.state.worker.engine.batch_event(batch)
        if event._flag:
            await anyio.lowlevel.checkpoint()
        else:
            await event.wait()
