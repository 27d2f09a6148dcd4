"""keybatch: a key-sharded, in-memory batch processor on structured concurrency.

All operations on one key go to one worker task, chosen by an mmh3 hash of the
key. Per key, a batch loads the resource once, applies every operation that
arrives during its window in call order, saves once, and gives every caller
its own result or its own exception.
"""

from importlib.metadata import PackageNotFoundError as _NotFound
from importlib.metadata import version as _version

from ._errors import (
    BatchError,
    Conflict,
    KeybatchError,
    KeyBusy,
    LoadError,
    Overloaded,
    ProcessorStopped,
    SaveError,
)
from ._pending import Pending
from ._processor import Processor, open_processor
from ._records import BatchReport, ProcessorStatistics
from ._routing import worker_for_key
from ._util import publish as _publish

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

try:
    __version__ = _version("keybatch")
except _NotFound:  # pragma: no cover - running from a tree that is not installed
    __version__ = "0+unknown"

# Batchers built on the public API above: imported after it (they import keybatch).
from .loader import open_loader
from .writer import open_writer

# Public names say they live here, as in trio.
_publish(globals())
