"""Testing code that uses keybatch: a faulty store, a history checker, virtual time.

- [`memory_store`][keybatch.testing.memory_store] keeps resources in memory and
  injects latency and failures into `load` and `save` (per key, by seeded
  probability, on the Nth call, or by a predicate; an exception, a hang past the
  batch deadline, or a cancellation, before or after the write lands). A
  versioned store refuses a stale save with `keybatch.Conflict`, and another
  writer's changes can be injected.
- [`recorder`][keybatch.testing.recorder] logs every call, application, outcome,
  load and save (and exclusive sections, and a watched store's writes), and
  [`Recorder.check`][keybatch.testing.Recorder.check] verifies
  the log: operations of a key applied in call order, each at most once (a
  batch refused with `Conflict` replays them, once more each), batches
  of a key never overlapping, every reported success saved, the saved state
  equal to applying the committed operations one by one, and sections holding
  their keys alone.
- [`run_autojump`][keybatch.testing.run_autojump],
  [`assert_elapsed`][keybatch.testing.assert_elapsed] and the `virtual_clock`
  pytest fixture run tests in trio's virtual time. The fixture comes with
  keybatch's pytest plugin, which pytest loads by itself once keybatch is
  installed.

Built on keybatch's public API only.
"""

from __future__ import annotations

from keybatch._util import publish

from ._clock import assert_elapsed, run_autojump
from ._history import APPLY as APPLY
from ._history import CALL as CALL
from ._history import EXTERNAL as EXTERNAL
from ._history import HELD as HELD
from ._history import LOAD as LOAD
from ._history import LOAD_FAILED as LOAD_FAILED
from ._history import LOADED as LOADED
from ._history import OUTCOME as OUTCOME
from ._history import RELEASED as RELEASED
from ._history import SAVE as SAVE
from ._history import SAVE_FAILED as SAVE_FAILED
from ._history import SAVED as SAVED
from ._history import SECTION as SECTION
from ._history import WRITE as WRITE
from ._history import Event, HistoryViolation, check_history
from ._recorder import Recorder, recorder
from ._store import Injection, MemoryStore, memory_store

# The values of Event.kind (APPLY, CALL, ...) are public names outside __all__.
# The order of __all__ is the API reference's.
__all__ = [
    "memory_store",
    "MemoryStore",
    "Injection",
    "recorder",
    "Recorder",
    "Event",
    "check_history",
    "HistoryViolation",
    "run_autojump",
    "assert_elapsed",
]


# Public names say they live here (reprs, tracebacks, pickling), as in keybatch.
publish(globals())
