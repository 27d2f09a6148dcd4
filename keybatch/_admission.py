"""Admission under `max_pending`: a FIFO queue of callers waiting for room.

The engine serves it: whenever room is made (an outcome delivered, an operation
withdrawn), it accepts the first waiters' operations itself, in call order, and
only then wakes them. So no woken task races a newcomer for the room, and a
caller that waits is never overtaken. Cancelling a waiter before it was served
removes it (lazily, in O(1)); stopping the processor refuses every waiter.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from contextvars import Context
from typing import Any

__all__ = ["Admission", "Waiter"]


class Waiter:
    """One call waiting for room; `slot` is set when the engine admits it."""

    __slots__ = (
        "worker",
        "key",
        "op",
        "args",
        "kwargs",
        "ctx",
        "event",
        "slot",
        "refused",
        "cancelled",
        "section",
    )

    def __init__(
        self,
        worker: Any,
        key: Hashable,
        op: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        ctx: Context,
        event: Any,
    ) -> None:
        self.worker = worker
        self.key = key
        self.op = op
        self.args = args
        self.kwargs = kwargs
        self.ctx = ctx
        self.event = event
        self.slot: Any = None
        self.refused = False
        self.cancelled = False
        # An exclusive section queued behind the callers waiting for room: it
        # needs no room, but must not overtake them. Its keys, routed.
        self.section: list[Any] | None = None

    def __repr__(self) -> str:
        state = (
            "admitted"
            if self.slot is not None
            else "refused"
            if self.refused
            else "cancelled"
            if self.cancelled
            else "waiting"
        )
        return f"<Waiter key={self.key!r} {state}>"

    def refuse(self) -> None:
        self.refused = True
        self.event.set()


class Admission:
    """The FIFO of waiters; `waiting` counts the ones not cancelled."""

    __slots__ = ("_queue", "waiting")

    def __init__(self) -> None:
        self._queue: deque[Waiter] = deque()
        self.waiting = 0

    def __repr__(self) -> str:
        return f"<Admission waiting={self.waiting}>"

    def push(self, waiter: Waiter) -> None:
        self._queue.append(waiter)
        self.waiting += 1

    def peek(self) -> Waiter:
        """The first waiter not cancelled (call only while `waiting`)."""
        queue = self._queue
        while queue[0].cancelled:
            queue.popleft()
        return queue[0]

    def pop(self) -> Waiter:
        """The first waiter not cancelled (call only while `waiting`)."""
        queue = self._queue
        waiter = queue.popleft()
        while waiter.cancelled:
            waiter = queue.popleft()
        self.waiting -= 1
        return waiter

    def cancel(self, waiter: Waiter) -> None:
        """A waiter not admitted yet was cancelled: it leaves the queue."""
        waiter.cancelled = True
        self.waiting -= 1
        queue = self._queue
        if not self.waiting:
            queue.clear()
            return
        while queue and queue[-1].cancelled:
            queue.pop()
        while queue and queue[0].cancelled:
            queue.popleft()

    def keys(self) -> set[Hashable]:
        """The keys of the calls waiting for room (O(waiters))."""
        return {w.key for w in self._queue if not w.cancelled and w.section is None}

    def refuse_all(self) -> None:
        queue = self._queue
        while queue:
            waiter = queue.popleft()
            if not waiter.cancelled:
                waiter.refuse()
        self.waiting = 0
