"""A buffered writer: items go to a bulk sink in batches, per key.

`async with open_writer(sink) as writer:` then `await writer.write(item)`
from any task. Items are buffered per key and handed to
`await sink(key, items)` when the key's buffer holds `batch_size` items or
`flush_interval` seconds after its first item, whichever comes first. Transient
sink failures are retried with exponential backoff; items that finally fail go to
`on_error`.

Built on the public [`keybatch.open_processor`][keybatch.open_processor] only:
one batch of the processor is one flush. Its resource is a fresh buffer, each
write is an operation that appends to it, its save calls the sink (retries
included), and its workers bound the flushes in flight.
"""

from ._errors import DependencyFailed, WriteError
from ._open import open_writer
from ._records import FlushReport, WriterStatistics
from ._retry import exponential_backoff
from ._writer import Writer

# The order of __all__ is the API reference's.
__all__ = [
    "open_writer",
    "Writer",
    "WriterStatistics",
    "FlushReport",
    "WriteError",
    "DependencyFailed",
    "exponential_backoff",
]


def _rehome() -> None:
    # Public names say they live here (reprs, pickles, docs), as in keybatch itself.
    for name in __all__:
        globals()[name].__module__ = __name__


_rehome()
del _rehome
