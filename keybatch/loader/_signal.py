"""A one-shot signal that many tasks wait for, on trio or on asyncio.

On trio it is ``trio.Event``. On asyncio, ``asyncio.Event`` (and anyio's Event,
which wraps it) removes each waiter from a deque when it wakes, which costs
O(waiters) per waiter; a window with a thousand callers would pay a million
steps. :class:`FutureSignal` keeps a plain list of futures instead and never
removes one: a cancelled waiter's future is cancelled, and ``set`` skips it.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol

__all__ = ["FutureSignal", "Signal", "signal_factory"]


class Signal(Protocol):
    """What the loader needs of an event: set it once, wait for it."""

    def is_set(self) -> bool: ...

    def set(self) -> None: ...

    def wait(self) -> Awaitable[object]: ...


class FutureSignal:
    """A one-shot event on asyncio: one future per waiter, in a list."""

    __slots__ = ("_loop", "_futures", "_set")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._futures: list[asyncio.Future[None]] = []
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        futures, self._futures = self._futures, []
        for future in futures:
            if not future.done():  # a cancelled waiter's future is done
                future.set_result(None)

    def wait(self) -> Awaitable[None]:
        """Return a future to await until the signal is set (a done one if it
        is set already: awaiting it then does not yield).

        A plain method returning a future, not a coroutine: one frame less per
        waiter. Cancellation of the awaiting task cancels its own future only.
        """
        future = self._loop.create_future()
        if self._set:
            future.set_result(None)
        else:
            self._futures.append(future)
        return future


def signal_factory() -> Callable[[], Signal]:
    """Return the signal constructor for the running event loop."""
    trio = sys.modules.get("trio")  # not imported: not running (asyncio path)
    if trio is not None:
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
        else:
            return trio.Event  # type: ignore[no-any-return]
    loop = asyncio.get_running_loop()
    return lambda: FutureSignal(loop)
