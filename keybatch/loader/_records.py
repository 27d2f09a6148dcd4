"""The loader's snapshot of its counters."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LoaderStatistics"]


@dataclass(frozen=True)
class LoaderStatistics:
    """A snapshot of a loader's counters.

    Returned by [`Loader.statistics`][keybatch.loader.Loader.statistics].

    Attributes:
        loads: ids asked for (by `load`, `load_nowait`, and one per id of
            `load_many`).
        cache_hits: Of those, ids answered from the cache.
        shared_loads: Of those, ids answered by a `batch_load` call that was
            already running for them (with the cache on).
        batches: `batch_load` calls made, failed ones included.
        ids_loaded: ids passed to `batch_load` (each window's ids are distinct).
        failed_batches: `batch_load` calls that raised or returned no mapping.
        missing: ids a `batch_load` call left out of its mapping.
        batches_in_flight: `batch_load` calls running now.
        cached: Values in the cache now.
        failed_ids: ids whose value in the mapping was an exception.
    """

    loads: int
    cache_hits: int
    shared_loads: int
    batches: int
    ids_loaded: int
    failed_batches: int
    missing: int
    batches_in_flight: int
    cached: int
    failed_ids: int = 0
