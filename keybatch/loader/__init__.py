"""A DataLoader-style batched reader: many `load(id)` calls, one `batch_load`.

`async with open_loader(batch_load) as loader:` then `await loader.load(id)`
from many tasks. The ids asked for within one window go to one
`await batch_load(ids)` call, which returns a mapping from id to value; each
caller gets its own value, or its own exception.

Built on anyio and on keybatch's public exceptions only (plus the documented
`keybatch._util` helpers for its classes): a list of ids per window, one
`batch_load` per window run by one of `concurrency` worker tasks, and, with the
cache on, a table of the ids being loaded so that later loads share the call.
"""

# isort: off
# The order of the API reference (mkdocstrings lists names in import order).
from ._errors import BatchLoadError
from ._errors import LoadFailed
from ._records import LoaderStatistics
from ._handle import PendingLoad
from ._loader import Loader
from ._open import open_loader

# isort: on

__all__ = [
    "BatchLoadError",
    "LoadFailed",
    "Loader",
    "LoaderStatistics",
    "PendingLoad",
    "open_loader",
]


def _rehome() -> None:
    # Public names say they live here (reprs, pickles, docs), as in keybatch itself.
    for name in __all__:
        globals()[name].__module__ = __name__


_rehome()
del _rehome
