"""Small helpers shared by the private modules."""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import anyio
import trio

__all__ = [
    "AsyncioEvent",
    "Room",
    "NoPublicConstructor",
    "backend_primitives",
    "foreign_loop_error",
    "is_async_callable",
]

ASYNC_FLAGS = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


class NoPublicConstructor(type):
    """Metaclass of classes that only a keybatch factory may build."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"{cls.__module__}.{cls.__qualname__} has no public constructor"
        )

    def _create(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, **kwargs)


def is_async_callable(obj: object) -> bool:
    """Return True if calling ``obj`` gives a coroutine (functions, partials, methods,
    and objects whose ``__call__`` is ``async def``)."""
    code = getattr(obj, "__code__", None)
    if code is not None:
        return bool(code.co_flags & ASYNC_FLAGS)
    if inspect.iscoroutinefunction(obj):
        return True
    return callable(obj) and inspect.iscoroutinefunction(type(obj).__call__)


class Room:
    """Tasks waiting for room under a bound, woken first come, first served."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: deque[Any] = deque()

    def __len__(self) -> int:
        return len(self._waiters)

    def wake(self, n: int) -> None:
        """Wake up to ``n`` waiters (room for ``n`` more was made)."""
        waiters = self._waiters
        while n > 0 and waiters:
            waiters.popleft().set()
            n -= 1

    def wake_all(self) -> None:
        self.wake(len(self._waiters))

    async def wait(self, event: Any) -> None:
        """Park on ``event`` until woken. Cancellation: raised here; a waiter
        woken but cancelled before it ran passes its room on to the next one."""
        self._waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            try:
                self._waiters.remove(event)
            except ValueError:  # already woken: pass the room on
                self.wake(1)
            raise


class AsyncioEvent:
    """An event for many waiters on asyncio: they all park on one shared future.

    asyncio.Event gives every waiter a future of its own and wakes them one by
    one from Python; a batch's callers can share one future, woken in one go by
    the loop, as a hand-written batcher does. The catch is that cancelling a task
    cancels the future it awaits, so one cancelled caller would wake the others
    with CancelledError. A waiter tells the two apart with ``Task.cancelling()``
    (Python 3.11+): it is raised if its own task was asked to cancel, and waits
    again on a fresh future otherwise. A task that already has a cancellation
    request pending when it starts to wait (so the count cannot tell) waits on
    a private future instead. ``Processor.run`` inlines the shared-future wait.

    Like asyncio.Event, ``wait`` does not yield when the event is set already.
    """

    __slots__ = ("_loop", "_flag", "_future", "_private")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._flag = False
        self._future: asyncio.Future[None] | None = None
        self._private: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if self._flag:
            return
        self._flag = True
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)
        if self._private is not None:
            for future in self._private:
                if not future.done():
                    future.set_result(None)

    async def wait(self) -> bool:
        """Wait until set. Cancellation: raised here; the event is unaffected."""
        if self._flag:
            return True
        task: Any = asyncio.current_task()
        if task is None or task.cancelling():
            future = self._loop.create_future()
            if self._private is None:
                self._private = [future]
            else:
                self._private.append(future)
            await future
            return True
        while not self._flag:
            future = self.shared_future()
            try:
                await future
            except asyncio.CancelledError:
                if task.cancelling() or not future.cancelled():
                    raise  # our own cancellation
                # Another waiter's cancellation cancelled the shared future.
            except BaseException as exc:
                if not future.done() and future._asyncio_future_blocking:
                    # Awaited by another event loop (trio.run() inside an asyncio
                    # task): unblock the shared future for the other waiters.
                    future._asyncio_future_blocking = False
                    raise foreign_loop_error() from exc
                raise
        return True

    def shared_future(self) -> asyncio.Future[None]:
        """The future to park on while the event is not set (made on demand)."""
        future = self._future
        if future is None or future.done():  # done and not set: cancelled
            future = self._future = self._loop.create_future()
        return future


def foreign_loop_error() -> RuntimeError:
    """The error for a call from another event loop running in the same thread."""
    return RuntimeError(
        "keybatch: a Processor must be used from the event loop that opened it,"
        " not from another event loop in the same thread (asyncio.run() inside"
        " trio, or trio.run() inside asyncio)"
    )


def backend_primitives() -> tuple[
    Callable[[], Any], Callable[[], float], Callable[..., Any]
]:
    """Return ``(new_event, current_time, cancel_scope)`` for the running loop.

    Under trio these are trio's own (anyio's wrappers cost about 25% more per
    event cycle, and more per cancel scope); under asyncio, :class:`AsyncioEvent`
    (asyncio.Event before Python 3.11), the loop's clock and anyio's CancelScope
    (its asyncio class, called directly), which cancels an event wait like any
    other await. Neither event's ``wait``
    checkpoints when the event is set already: callers that may find it set
    checkpoint themselves.
    """
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        loop = asyncio.get_running_loop()
        # anyio.CancelScope(...) looks the backend up on every call; the class it
        # returns, called directly, builds the same scope at about half the cost.
        cancel_scope = type(anyio.CancelScope())
        if sys.version_info >= (3, 11):
            return partial(AsyncioEvent, loop), loop.time, cancel_scope
        return asyncio.Event, loop.time, cancel_scope  # pragma: no cover
    else:
        return trio.Event, trio.current_time, trio.CancelScope


# Re-exported so the rest of the package names one checkpoint.
checkpoint = anyio.lowlevel.checkpoint
