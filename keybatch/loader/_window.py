"""A window: the ids asked for together, then the outcome of their batch_load."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from ._signal import Signal

__all__ = ["CLOSED", "DONE", "LOADING", "OPEN", "Window"]

# A window's life: OPEN (taking ids), CLOSED (waiting for a worker), LOADING
# (its batch_load runs), DONE (outcome known, signal set).
OPEN = 0
CLOSED = 1
LOADING = 2
DONE = 3


class Window:
    """The ids of one future ``batch_load`` call, and later its outcome.

    ``ids`` maps each distinct id to the number of callers waiting for it (a
    caller cancelled before the window loads takes itself off; an id nobody
    waits for any more leaves the window). Its order is the order in which the
    ids were first asked for, which is the order ``batch_load`` gets them in.
    """

    __slots__ = (
        "ids",
        "state",
        "signal",
        "values",
        "error",
        "deadline",
        "claimed",
        "helped",
        "wake",
    )

    def __init__(self, signal: Signal, deadline: float) -> None:
        self.ids: dict[Hashable, int] = {}
        self.state = OPEN
        self.signal = signal  # set once the outcome is known
        self.values: Mapping[Any, Any] = {}
        self.error: BaseException | None = None  # batch_load raised, or teardown
        self.deadline = deadline  # when an OPEN window closes (max_wait)
        self.claimed = False  # a worker (or a helper) will run it
        self.helped = False  # a helper task was started for it
        self.wake: Signal | None = None  # its worker waits on it for max_wait
