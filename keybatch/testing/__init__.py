"""Testing code that uses keybatch: a faulty store, a history checker, virtual time.

* :func:`memory_store` keeps resources in memory and injects latency and
  failures into ``load`` and ``save`` (per key, by seeded probability, on the
  Nth call, or by a predicate; an exception, a hang past the batch deadline, or
  a cancellation).
* :func:`recorder` logs every call, application, outcome, load and save, and
  :meth:`Recorder.check` verifies the log: operations of a key applied in call
  order, each at most once, batches of a key never overlapping, every reported
  success saved, and the saved state equal to applying the committed operations
  one by one.
* :func:`run_autojump`, :func:`assert_elapsed` and the ``virtual_clock`` pytest
  fixture run tests in trio's virtual time.

Built on keybatch's public API only.
"""

from __future__ import annotations

import trio.testing

# Imported in the old module's source order: the reference page lists them so.
# isort: off
from ._store import Injection, MemoryStore, memory_store
from ._history import Event, HistoryViolation
from ._recorder import Recorder, recorder
from ._history import check_history
from ._clock import run_autojump, assert_elapsed

# isort: on
# The values of Event.kind: public names, outside __all__ (as before the split).
from ._history import APPLY as APPLY
from ._history import CALL as CALL
from ._history import LOAD as LOAD
from ._history import LOAD_FAILED as LOAD_FAILED
from ._history import LOADED as LOADED
from ._history import OUTCOME as OUTCOME
from ._history import SAVE as SAVE
from ._history import SAVE_FAILED as SAVE_FAILED
from ._history import SAVED as SAVED

__all__ = [
    "Event",
    "HistoryViolation",
    "Injection",
    "MemoryStore",
    "Recorder",
    "assert_elapsed",
    "check_history",
    "memory_store",
    "recorder",
    "run_autojump",
]

# Public names say they live here (reprs, tracebacks, pickling), as in keybatch.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("keybatch.testing._"):
        _obj.__module__ = "keybatch.testing"
del _name, _obj

# The fixture is defined here, not imported, so that the reference page lists it.
try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only a test dependency
    pass
else:

    @pytest.fixture
    def virtual_clock() -> trio.testing.MockClock:
        """pytest fixture: an autojump ``MockClock`` for pytest-trio tests.

        Import it into a ``conftest.py`` (``from keybatch.testing import
        virtual_clock``) and request it in a ``@pytest.mark.trio`` test.
        """
        return trio.testing.MockClock(autojump_threshold=0)
