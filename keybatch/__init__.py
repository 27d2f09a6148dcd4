"""keybatch: a key-sharded, in-memory batch processor on structured concurrency.

All operations on one key go to one worker task, chosen by an mmh3 hash of the
key. Per key, a batch loads the resource once, applies every operation that
arrives during its window in arrival order, saves once, and gives every caller
its own result or its own exception.
"""

from ._errors import (
    BatchError,
    Conflict,
    KeyBusy,
    KeybatchError,
    LoadError,
    Overloaded,
    ProcessorStopped,
    SaveError,
)
from ._pending import Pending
from ._processor import Processor, open_processor
from ._records import BatchReport, ProcessorStatistics
from ._routing import worker_for_key

__all__ = [
    "BatchError",
    "BatchReport",
    "Conflict",
    "KeyBusy",
    "KeybatchError",
    "LoadError",
    "Overloaded",
    "Pending",
    "Processor",
    "ProcessorStatistics",
    "ProcessorStopped",
    "SaveError",
    "open_loader",
    "open_processor",
    "open_writer",
    "worker_for_key",
]

__version__ = "0.1.0"

# Batchers built on the public API above: imported after it (they import keybatch).
from .loader import open_loader
from .writer import open_writer

# Public names say they live here, as in trio.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("keybatch._"):
        _obj.__module__ = "keybatch"
del _name, _obj
