"""The state model: options, counters, key state, batches, slots and their states.

Imports nothing above it. Every object here is plain data with the few steps that
change it in one place; the engine (`_engine`) drives them, the backends park
callers on them, and the facade (`_processor`) reads the counters.

Ownership: a [`KeyState`][keybatch._model.KeyState] belongs to one worker and
lives while its key has queued work, a batch in flight, or an exclusive section;
a [`Batch`][keybatch._model.Batch] is what one load/apply/save cycle takes, and
its callers park on its one event; a slot ([`Pending`][keybatch.Pending]) is one
accepted operation and, later, its outcome.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from ._records import ProcessorStatistics

__all__ = [
    "Batch",
    "CloseReason",
    "Counters",
    "KeyPhase",
    "KeyState",
    "Options",
    "SaveFailure",
    "Section",
    "SlotState",
]


class SlotState(enum.Enum):
    """Where one accepted operation stands. Only QUEUED may be withdrawn."""

    QUEUED = "queued"  # accepted, not applied yet
    WITHDRAWN = "withdrawn"  # its caller was cancelled before it was applied
    VALUE = "value"  # applied; _outcome is what it returned
    RAISED = "raised"  # applied; _outcome is what it raised
    LOAD_FAILED = "load failed"  # never applied: the batch's load failed
    SAVE_FAILED = "save failed"  # applied, then the save failed
    ABORTED = "aborted"  # never applied: the processor was torn down


class KeyPhase(enum.Enum):
    """Where a key's head of queue stands in its worker."""

    NEW = "new"  # work queued; waiting for the worker to start a batch
    LOADING = "loading"
    OPEN = "open"  # loaded; the window is open until close_at
    SAVING = "saving"  # closed: applying, saving, delivering
    HELD = "held"  # an exclusive section holds the key
    GONE = "gone"  # dropped from its worker


class CloseReason(str, enum.Enum):
    """Why a batch's window closed (`BatchReport.close_reason`)."""

    WINDOW = "window"
    MAX_OPS = "max_ops"
    FLUSH = "flush"
    STOP = "stop"


@dataclass(frozen=True)
class Options:
    """The processor's options, validated once by `open_processor`."""

    load: Callable[[Any], Any] | None
    save: Callable[[Any, Any], Any] | None
    min_duration: float
    max_duration: float | None
    workers: int
    router: Callable[[Any, int], int] | None
    max_ops: int | None
    max_pending: int | None
    on_batch: Callable[[Any], object] | None
    max_replays: int

    @property
    def timed(self) -> bool:
        """Whether batches need the clock (a window, a deadline or reports)."""
        return (
            self.min_duration > 0
            or self.max_duration is not None
            or self.on_batch is not None
        )


class Counters:
    """The processor's counts. Its methods are the only way they change."""

    __slots__ = (
        "pending",
        "active",
        "done",
        "batches",
        "load_failures",
        "save_failures",
        "op_failures",
        "withdrawn",
        "conflicts",
        "sections",
    )

    def __init__(self) -> None:
        self.pending = 0  # accepted, outcome not delivered
        self.active = 0  # batches loading, open or saving
        self.done = 0  # outcomes delivered
        self.batches = 0
        self.load_failures = 0
        self.save_failures = 0
        self.op_failures = 0
        self.withdrawn = 0
        self.conflicts = 0
        self.sections = 0  # exclusive sections holding their keys

    def __repr__(self) -> str:
        return f"<Counters pending={self.pending} active={self.active}>"

    def accepted(self) -> None:
        self.pending += 1

    def withdrawn_one(self) -> None:
        self.pending -= 1
        self.withdrawn += 1

    def batch_started(self) -> None:
        self.active += 1

    def batch_finished(
        self, delivered: int, op_failures: int, load_failed: bool, save_failed: bool
    ) -> None:
        self.pending -= delivered
        self.done += delivered
        self.batches += 1
        self.active -= 1
        self.op_failures += op_failures
        if load_failed:
            self.load_failures += 1
        if save_failed:
            self.save_failures += 1

    def aborted(self, delivered: int, active: bool) -> None:
        """`delivered` queued operations failed with ProcessorStopped."""
        self.pending -= delivered
        self.done += delivered
        if active:
            self.active -= 1

    def conflict(self) -> None:
        self.conflicts += 1

    def section_held(self) -> None:
        self.sections += 1

    def section_released(self) -> None:
        self.sections -= 1

    def statistics(
        self, workers: int, keys: int, stopping: bool, max_worker_queue: int
    ) -> ProcessorStatistics:
        """The record; `keys` and `max_worker_queue` are read off the workers
        (the keys each worker holds state for, and its queue), not counted."""
        return ProcessorStatistics(
            workers=workers,
            keys=keys,
            active_batches=self.active,
            pending_operations=self.pending,
            operations_done=self.done,
            batches_done=self.batches,
            load_failures=self.load_failures,
            save_failures=self.save_failures,
            operation_failures=self.op_failures,
            operations_withdrawn=self.withdrawn,
            stopping=stopping,
            max_worker_queue=max_worker_queue,
            conflicts=self.conflicts,
            exclusive_sections=self.sections,
        )


class Batch:
    """The operations one batch takes, in call order.

    `live` counts slots not withdrawn. Each `run` caller parks on its own slot
    (see the backends); `event` is made only when something waits for the
    whole batch (`flush`, `Pending.result`), and set when the batch finished.
    """

    __slots__ = ("state", "slots", "event", "live", "finished", "urgent", "withdrawn")

    def __init__(self, state: KeyState) -> None:
        self.state = state
        self.slots: list[Any] = []  # Pending objects, in call order
        self.event: Any = None
        self.live = 0
        self.finished = False
        self.urgent = False  # flush() asked: close as soon as loaded
        self.withdrawn = 0

    def __repr__(self) -> str:
        return (
            f"<Batch key={self.state.key!r} ops={len(self.slots)} live={self.live}"
            f" finished={self.finished}>"
        )


class SaveFailure:
    """What the slots of a batch whose save failed hold as their outcome."""

    __slots__ = ("cause", "may_have_landed")

    def __init__(self, cause: Any, may_have_landed: bool) -> None:
        self.cause = cause
        self.may_have_landed = may_have_landed


class Section:
    """An exclusive section's place in the queues of its keys.

    It waits until it is at the head of every key's queue (everything called
    before it finished), then holds those keys until released.
    """

    __slots__ = ("keys", "states", "reached", "event", "held", "failed", "released")

    def __init__(self, keys: tuple[Hashable, ...], event: Any) -> None:
        self.keys = keys
        self.states: list[KeyState] = []
        self.reached = 0  # keys at whose head of queue it stands
        self.event = event  # set once every key is reached, or on failure
        self.held = False
        self.failed = False  # the processor was torn down while it waited
        self.released = False

    def __repr__(self) -> str:
        state = "held" if self.held else "released" if self.released else "waiting"
        return f"<Section keys={self.keys!r} {state}>"


class KeyState:
    """A key's queue (batches and sections, in call order) and its batch in flight.

    `tail` is the batch that takes new operations, or None when a new one must
    start (none yet, the last one is closing or full, or a section stands last).
    """

    __slots__ = (
        "key",
        "worker",
        "queue",
        "tail",
        "phase",
        "start",
        "wall_start",
        "deadline",
        "resource",
        "in_ready",
        "batch_no",
        "load_duration",
        "closing",
        "close_at",
        "failure",
        "conflict",
    )

    def __init__(self, key: Hashable, worker: Any, start: float) -> None:
        self.key = key
        self.worker = worker
        # A list, not a deque: it holds one or two entries as a rule, and a
        # deque's first block alone is over 500 bytes.
        self.queue: list[Batch | Section] = []
        self.tail: Batch | None = None
        self.phase = KeyPhase.NEW
        self.start = start
        self.wall_start = 0.0
        self.deadline = math.inf
        self.resource: Any = None
        self.in_ready = False
        self.batch_no = 0
        self.load_duration = 0.0
        self.closing: Batch | None = None  # the batch being applied and saved
        self.close_at = math.inf
        # The failure of the batch in flight, on its way to the callers (see
        # Engine._load: never in a local variable), and a Conflict being replayed.
        self.failure: Any = None
        self.conflict: Any = None

    def __repr__(self) -> str:
        return (
            f"<KeyState key={self.key!r} phase={self.phase.value}"
            f" queued={len(self.queue)} worker={getattr(self.worker, 'index', '?')}>"
        )
