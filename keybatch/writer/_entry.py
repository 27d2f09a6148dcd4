"""One accepted item: where it is, and how it ended."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

__all__ = ["BUFFERED", "DONE", "FLUSHING", "HELD", "Entry"]

# An entry's life: HELD (waiting for the ids in its ``after=``) or BUFFERED (in
# its key's buffer), then FLUSHING (in a flush: a sink call, or waiting to
# retry), then DONE (written, failed, dropped or withdrawn).
HELD = 0
BUFFERED = 1
FLUSHING = 2
DONE = 3


class Entry:
    """An accepted item and its bookkeeping.

    ``failure`` says how a ``write_sync`` caller learns that the item was not
    written: ``(exception class, args, kwargs, cause)``, so that each caller
    raises an exception object of its own.
    """

    __slots__ = (
        "item",
        "key",
        "id",
        "seq",
        "state",
        "missing",
        "attempts",
        "waiter",
        "failure",
    )

    def __init__(self, item: Any, key: Hashable, id: Hashable, seq: int) -> None:
        self.item = item
        self.key = key
        self.id = id  # None: no id
        self.seq = seq  # acceptance order: flush() covers seq <= its mark
        self.state = BUFFERED
        self.missing = 0  # dependencies not written yet (while HELD)
        self.attempts = 0  # sink calls that held it
        self.waiter: Any = None  # an event, for a write_sync caller
        self.failure: (
            tuple[type[BaseException], tuple[Any, ...], dict[str, Any], Any] | None
        ) = None
