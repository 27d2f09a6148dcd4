"""The event-loop backends: one Protocol, one implementation per loop.

The processor picks its backend once, when it opens, from the running loop.
Everything loop-specific (events, clock, cancel scopes, how a caller parks and
withdraws) lives behind [`Backend`][keybatch._backends.Backend]; every use of a
private asyncio detail lives in `_asyncio.py` alone. The asyncio path never
imports trio.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

__all__ = ["Backend", "Event", "Scope", "current_backend", "foreign_loop_error"]


class Event(Protocol):
    """A one-shot event: `wait` returns once `set` was called."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    async def wait(self) -> Any: ...


class Scope(Protocol):
    cancelled_caught: bool


class Backend(Protocol):
    """What the engine and the facade need from an event loop."""

    name: str

    @property
    def cancelled(self) -> type[BaseException]:
        """The exception class of this loop's cancellation."""
        ...

    def new_event(self) -> Event:
        """A fresh event."""
        ...

    def now(self) -> float:
        """The loop's clock (virtual under trio's MockClock)."""
        ...

    def cancel_scope(
        self, *, deadline: float = ..., shield: bool = ...
    ) -> AbstractContextManager[Scope]:
        """A cancel scope with an absolute deadline, optionally shielded."""
        ...

    def checkpoint(self) -> Awaitable[None]:
        """Yield to the loop once; raise if cancelled."""
        ...

    def waiter(self, check: bool = ...) -> Any:
        """What the calling task parks on (trio: the task; asyncio: a fresh
        future), or None if `check` and the task is cancelled already: `run`
        then checkpoints before it accepts anything."""
        ...

    def park(self, slot: Any) -> Awaitable[Any]:
        """What `run` awaits for `slot` (whose `_waiter` is set): it returns the
        operation's value or raises its error. Detects a foreign event loop."""
        ...

    def unpark(self, slot: Any, exc: BaseException) -> None:
        """`run`'s wait raised `exc`: withdraw the slot if it was not applied
        yet; raise instead what the slot's outcome or a foreign loop calls for."""
        ...

    def wake(self, slots: list[Any]) -> None:
        """A batch finished: give each parked caller among `slots` its own
        outcome (a value, or an error object made for it)."""
        ...

    @property
    def sweep(self) -> Callable[[list[Any], Callable[[Any], None]], None] | None:
        """Withdraws, before a batch applies them, the queued slots whose
        caller was cancelled without having run since (asyncio), or None
        (trio: its abort callback withdraws at once). `sweep(slots, withdraw)`."""
        ...

    async def wait_result(self, slot: Any) -> None:
        """Park until the slot's batch finished, withdrawing nothing
        (`Pending.result`). Always a checkpoint."""
        ...

    def own_cancellation(self) -> bool:
        """Inside a `cancelled` exception: was it aimed at the current task (a
        scope or the task's owner) rather than raised by something it awaited?"""
        ...


def current_backend() -> Backend:
    """The backend of the running event loop (trio if trio runs, else asyncio)."""
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass
        else:
            from ._trio import TrioBackend

            return TrioBackend()
    from ._asyncio import AsyncioBackend

    return AsyncioBackend()


def foreign_loop_error() -> RuntimeError:
    """The error for a call from another event loop running in the same thread."""
    return RuntimeError(
        "keybatch: a Processor must be used from the event loop that opened it,"
        " not from another event loop in the same thread (asyncio.run() inside"
        " trio, or trio.run() inside asyncio)"
    )
