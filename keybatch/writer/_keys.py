"""The state of one key, one flush in progress, and one flush() call."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from ._entry import Entry

__all__ = ["Flush", "FlushWait", "KeyState"]


class KeyState:
    """One key's buffer, and where the key is in its flush cycle.

    A key is in at most one of: armed (``due`` is set: a timer will make it
    ready), queued (in the writer's ready queue, waiting for a free slot), or
    flushing (one flush of the key at a time, retries included).
    """

    __slots__ = ("key", "buffer", "due", "queued", "flushing")

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.buffer: list[Entry] = []
        self.due: float | None = None  # when the armed timer fires
        self.queued = False
        self.flushing = False


class Flush:
    """A flush in progress: its entries, attempts, and the cancel scope of the
    step it is in (a sink call, a backoff, or the wait for a slot)."""

    __slots__ = (
        "keystate",
        "entries",
        "size",
        "attempts",
        "start",
        "bytes",
        "error",
        "failed",
        "scope",
        "in_sink",
    )

    def __init__(self, keystate: KeyState, entries: list[Entry], start: float) -> None:
        self.keystate = keystate
        self.entries = entries  # the entries of the next (or current) attempt
        self.size = len(entries)
        self.attempts = 0
        self.start = start
        self.bytes: int | None = None
        self.error: BaseException | None = None  # the last call's, if it raised
        self.failed = 0
        self.scope: Any = None
        self.in_sink = False


class FlushWait:
    """A ``flush()`` call: how many of the entries it covers are unfinished."""

    __slots__ = ("mark", "remaining", "event", "dropped")

    def __init__(self, mark: int, remaining: int, event: Any) -> None:
        self.mark = mark  # it covers the entries with seq <= mark
        self.remaining = remaining
        self.event = event
        self.dropped = False  # an entry it covers was dropped: raise
