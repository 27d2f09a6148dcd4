"""Waiting for room under the writer's `max_buffered` bound, in arrival order."""

from __future__ import annotations

from collections import deque

import anyio

__all__ = ["RoomQueue"]


class RoomQueue:
    """Writers parked until items leave the buffer, woken in arrival order.

    A woken writer owns one unit of room until it either uses it or hands it
    on: a waiter cancelled after its wake-up, or refused once awake, calls
    `pass_on` so that the next waiter is not left parked while there is
    room.
    """

    __slots__ = ("_parked",)

    def __init__(self) -> None:
        self._parked: deque[anyio.Event] = deque()

    def __len__(self) -> int:
        return len(self._parked)

    def release(self, count: int) -> None:
        """Room for `count` more items was made: wake that many waiters."""
        parked = self._parked
        for _ in range(min(count, len(parked))):
            parked.popleft().set()

    def release_all(self) -> None:
        """Wake every waiter (the writer is closing: they will be refused)."""
        self.release(len(self._parked))

    def pass_on(self) -> None:
        """A woken waiter does not use its room: give it to the next one."""
        self.release(1)

    async def park(self) -> None:
        """Wait until woken by `release`.

        Cancellation: raised here. A waiter cancelled after it was woken passes
        its room on to the next one.
        """
        event = anyio.Event()
        self._parked.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                self.pass_on()
            else:
                self._parked.remove(event)
            raise
