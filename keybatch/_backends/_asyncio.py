"""The asyncio backend (also uvloop, and eager task factories).

Every use of a private asyncio detail in keybatch lives here, gated by Python
version, with a public-API fallback. Set `KEYBATCH_ASYNCIO_PUBLIC_ONLY=1` to force
the fallback (CI runs the suite once that way); Python 3.10 always uses it.

How callers park. The callers of one batch share one future while none of them
is cancelled, as a hand-written batcher would: the batch's end wakes them all
with one `set_result`. Cancelling a task cancels the future it awaits, so the
first cancelled caller of a batch cancels the shared future and wakes the others
once; they tell it was not aimed at them (`Task.cancelling()` is 0) and re-park,
each on a future of its own, and the batch stays split. So a cancelled caller
costs O(1), except the first one of a batch, which costs one wake-up of each of
the batch's other sharers: at most `SHARED_MAX` (256) callers of a batch share its
future, the rest park on their own, so that too is bounded by a constant. The
fallback parks every caller on its own future.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
from collections.abc import Awaitable
from typing import Any, final

import anyio
import anyio.lowlevel

from .._model import SlotState
from .._pending import Pending, deliver
from . import foreign_loop_error

__all__ = ["PUBLIC_ONLY", "AsyncioBackend", "AsyncioEvent", "running_loop"]

QUEUED = SlotState.QUEUED
VALUE = SlotState.VALUE

#: Public asyncio API only: no Task.cancelling() (3.11+), no private attributes.
PUBLIC_ONLY = sys.version_info < (3, 11) or os.environ.get(
    "KEYBATCH_ASYNCIO_PUBLIC_ONLY", ""
) not in ("", "0")

_CancelledError = asyncio.CancelledError

#: At most this many callers of a batch share its future; the rest park on their
#: own. The first cancelled caller of a batch wakes the sharers once, so this
#: bounds what one cancellation costs (a constant, not the batch's size).
SHARED_MAX = 256

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
    """A batch's event on asyncio: a shared future, then private ones (above)."""

    __slots__ = ("_loop", "_flag", "_shared", "_private", "_split", "_sharing")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._flag = False
        self._shared: asyncio.Future[None] | None = None
        self._private: set[asyncio.Future[None]] | None = None
        self._split = PUBLIC_ONLY  # every waiter on a private future
        self._sharing = 0  # callers that parked on the shared future

    def __repr__(self) -> str:
        return f"<AsyncioEvent set={self._flag} split={self._split}>"

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if self._flag:
            return
        self._flag = True
        shared = self._shared
        if shared is not None and not shared.done():
            shared.set_result(None)
        private = self._private
        if private:
            for future in private:
                if not future.done():
                    future.set_result(None)
            self._private = None

    def _park_private(self) -> asyncio.Future[None]:
        future = self._loop.create_future()
        if self._private is None:
            self._private = {future}
        else:
            self._private.add(future)
        return future

    async def wait(self) -> bool:
        """Wait on a private future until set (the engine's own waits).

        Cancellation: raised here; the event is unaffected. Like asyncio.Event,
        returns at once, without yielding, when the event is set already.
        """
        if self._flag:
            return True
        future = self._park_private()
        try:
            await future
        except BaseException as exc:
            if (
                not PUBLIC_ONLY
                and not future.done()
                and future._asyncio_future_blocking
            ):
                # Awaited by another event loop (trio.run() inside an asyncio
                # task): that loop refused the future.
                future._asyncio_future_blocking = False
                raise foreign_loop_error() from exc
            raise
        finally:
            if self._private is not None:
                self._private.discard(future)
        return True


@final
class AsyncioBackend:
    __slots__ = ("_loop", "_scope_class", "_done")

    name = "asyncio"
    cancelled = asyncio.CancelledError

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._done.set_result(None)
        # anyio.CancelScope(...) looks the backend up on every call; the class it
        # returns, called directly, builds the same scope at about half the cost.
        self._scope_class: Any = type(anyio.CancelScope())

    def __repr__(self) -> str:
        return f"<AsyncioBackend public_only={PUBLIC_ONLY}>"

    def now(self) -> float:
        return self._loop.time()

    def new_event(self) -> AsyncioEvent:
        return AsyncioEvent(self._loop)

    def cancel_point(self) -> Awaitable[None]:
        """A cancellation already requested of this task (native, or delivered
        by an anyio scope) is raised before anything is accepted. An anyio
        scope that the task cancelled itself and has not delivered yet is not
        seen here (that would cost a walk of its scopes per call).

        Not a coroutine: the common case returns a finished future, which
        awaits without a frame or a yield."""
        if not PUBLIC_ONLY:
            task = _current_task(self._loop)
            if task is not None and task.cancelling():
                return anyio.lowlevel.checkpoint()
        return self._done

    async def checkpoint(self) -> None:
        await anyio.lowlevel.checkpoint()

    def cancel_scope(self, *, deadline: float = math.inf, shield: bool = False) -> Any:
        return self._scope_class(deadline=deadline, shield=shield)

    def own_cancellation(self) -> bool:
        if PUBLIC_ONLY:
            return True  # cannot tell: treat it as ours (documented)
        task = _current_task(self._loop)
        return task is None or task.cancelling() > 0

    async def wait(self, slot: Pending[Any]) -> Any:
        batch = slot._batch
        event: AsyncioEvent = batch.event
        loop = event._loop
        task = _current_task(loop)
        while not event._flag:
            private = (
                event._split
                or event._sharing >= SHARED_MAX
                or task is None
                or task.cancelling() > 0
            )
            if private:
                future = event._park_private()
            else:
                shared = event._shared
                if shared is None:
                    shared = event._shared = loop.create_future()
                event._sharing += 1
                future = shared
            try:
                await future
            except _CancelledError:
                if (
                    not private
                    and task is not None
                    and not task.cancelling()
                    and future.cancelled()
                ):
                    # Another caller's cancellation cancelled the shared future:
                    # from now on each caller of this batch parks on its own.
                    event._split = True
                    event._shared = None
                    continue
                if private and event._private is not None:
                    event._private.discard(future)
                elif future.cancelled():
                    event._split = True  # ours cancelled the shared future
                    event._shared = None
                if slot._state is QUEUED:  # never applied: withdraw it
                    batch.state.worker.engine.withdraw(slot)
                raise
            except BaseException as exc:
                if slot._state is QUEUED:
                    batch.state.worker.engine.withdraw(slot)
                if private and event._private is not None:
                    event._private.discard(future)
                if (
                    not PUBLIC_ONLY
                    and not future.done()
                    and future._asyncio_future_blocking
                ):
                    # Awaited by another event loop (trio.run() inside an asyncio
                    # task): unblock the future for the batch's other callers.
                    future._asyncio_future_blocking = False
                    raise foreign_loop_error() from exc
                raise
        if slot._state is VALUE:  # the common case, without a call
            return slot._outcome
        return deliver(slot)

    async def wait_result(self, slot: Pending[Any]) -> None:
        event = slot._batch.event
        if event._flag:
            await anyio.lowlevel.checkpoint()
        else:
            await event.wait()
