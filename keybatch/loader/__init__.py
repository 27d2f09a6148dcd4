"""A DataLoader-style batched reader: many `load(id)` calls, one `batch_load`.

`async with open_loader(batch_load) as loader:` then `await loader.load(id)`
from many tasks. The ids asked for within one window go to one
`await batch_load(ids)` call, which returns a mapping from id to value; each
caller gets its own value, or its own exception.

Built on anyio and on keybatch's public exceptions only, plus
`NoPublicConstructor` and `publish` from `keybatch._util` (the one internal
module meant for it): a list of ids per window, one `batch_load` per window run
by one of `concurrency` worker tasks, and, with the cache on, a table of the ids
being loaded so that later loads share the call.
"""

from keybatch._util import publish

from ._errors import BatchLoadError, LoadFailed
from ._handle import PendingLoad
from ._loader import Loader
from ._open import open_loader
from ._records import LoaderStatistics

# The order of __all__ is the API reference's.
__all__ = [
    "open_loader",
    "Loader",
    "PendingLoad",
    "LoaderStatistics",
    "BatchLoadError",
    "LoadFailed",
]

publish(globals())  # public names say they live here (reprs, pickles, docs)
