"""A buffered writer: items go to a bulk sink in batches, per key.

`async with open_writer(sink) as writer:` then `await writer.write(item)`
from any task. Items are buffered per key and handed to
`await sink(key, items)` when the key's buffer holds `batch_size` items or
`flush_interval` seconds (plus jitter) after its first item, whichever comes
first. Transient sink failures are retried with exponential backoff; a sink may
report per-item failures with [`Partial`][keybatch.writer.Partial]; items that
finally fail go to `on_error` and to
[`Writer.results`][keybatch.writer.Writer.results].

Built on anyio and on keybatch's public exceptions only, plus
`NoPublicConstructor` and `publish` from `keybatch._util` (the one internal
module meant for it): per-key buffers, one timer task, at most
`concurrent_flushes` sink calls at once, and a dependency graph
(`keybatch.writer._graph`) that returns decisions the writer applies.
"""

from keybatch._util import publish

from ._errors import DependencyFailed, WriteError
from ._open import open_writer
from ._records import FailedItem, FlushReport, Partial, WriteResults, WriterStatistics
from ._retry import MAX_BACKOFF, exponential_backoff
from ._writer import Writer

# The order of __all__ is the API reference's.
__all__ = [
    "open_writer",
    "Writer",
    "Partial",
    "WriteResults",
    "FailedItem",
    "WriterStatistics",
    "FlushReport",
    "WriteError",
    "DependencyFailed",
    "exponential_backoff",
    "MAX_BACKOFF",
]


publish(globals())  # public names say they live here (reprs, pickles, docs)
