"""A DataLoader-style batched reader: many `load(id)` calls, one `batch_load`.

`async with open_loader(batch_load) as loader:` then `await loader.load(id)`
from many tasks. The ids requested within one window go to one
`await batch_load(ids)` call, which returns a mapping from id to value; each caller
gets its own value, or its own exception.

Built on the public [`keybatch.open_processor`][keybatch.open_processor] only:
one batch of the processor is one `batch_load` call. Its resource is a fresh
batch, each `load` is an operation that adds its id to it and returns it, and its
save calls `batch_load`; `run` returns once that call is done, and the caller
reads its value from the batch.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Mapping,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, final

import anyio

import keybatch
from keybatch._util import NoPublicConstructor

# The order of __all__ is the API reference's.
__all__ = [
    "open_loader",
    "Loader",
    "LoaderStatistics",
    "BatchLoadError",
]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_checkpoint = anyio.lowlevel.checkpoint
_MISSING: Any = object()


class BatchLoadError(keybatch.KeybatchError):
    """The `batch_load` call that held this id raised, or returned no mapping.

    Every caller of the batch gets its own instance; `__cause__` is what
    `batch_load` raised.

    Attributes:
        id: The id this caller asked for.
    """

    def __init__(self, id: Hashable, message: str) -> None:
        super().__init__(message)
        self.id = id


@dataclass(frozen=True)
class LoaderStatistics:
    """A snapshot of a loader, returned by `Loader.statistics()`.

    Attributes:
        loads: ids asked for (by `load`, and one per id of `load_many`).
        cache_hits: Of those, ids answered from the cache.
        shared_loads: Of those, ids answered by a `batch_load` call that was
            already running for them (with the cache on).
        batches: `batch_load` calls made, failed ones included.
        ids_loaded: ids passed to `batch_load` (after removing duplicates).
        failed_batches: `batch_load` calls that raised or returned no mapping.
        missing: ids a `batch_load` call left out of its mapping.
        batches_in_flight: `batch_load` calls running now.
        cached: Values in the cache now.
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


class _Batch:
    """The resource of one processor batch: the ids asked for, then the values."""

    __slots__ = ("ids", "values", "generation", "error", "event")

    def __init__(self, generation: int) -> None:
        self.ids: dict[Any, None] = {}  # ordered, without duplicates
        self.values: Mapping[Any, Any] = {}
        self.generation = generation  # of the cache when the batch began
        self.error: BaseException | None = None  # what batch_load raised
        self.event: Any = None  # set when batch_load is done, if anyone waits


def _register(batch: _Batch, id: Any) -> _Batch:
    batch.ids[id] = None
    return batch


def _route(key: int, workers: int) -> int:
    return key


@final
class Loader(Generic[K, V], metaclass=NoPublicConstructor):
    """Batches `load(id)` calls into `batch_load(ids)` calls; built by
    [`open_loader`][keybatch.loader.open_loader]."""

    __slots__ = (
        "_proc",
        "_batch_load",
        "_max_batch",
        "_nkeys",
        "_key",
        "_count",
        "_busy",
        "_cache",
        "_inflight",
        "_generation",
        "_loads",
        "_hits",
        "_shared",
        "_batches",
        "_ids_loaded",
        "_failed",
        "_missing",
        "_in_flight",
    )

    def __init__(
        self,
        batch_load: Callable[[list[K]], Awaitable[Mapping[K, V]]],
        max_batch_size: int | None,
        concurrency: int,
        cache: bool,
    ) -> None:
        self._proc: keybatch.Processor[_Batch] = None  # type: ignore[assignment]
        self._batch_load = batch_load
        self._max_batch = max_batch_size
        self._nkeys = concurrency
        self._key = 0  # the processor key new loads go to
        self._count = 0  # loads sent to it since it became the current key
        self._busy = [False] * concurrency  # is the key's batch_load running?
        self._cache: dict[K, V] | None = {} if cache else None
        # with the cache: ids whose batch_load runs now -> their batch
        self._inflight: dict[K, _Batch] = {}
        self._generation = 0
        self._loads = 0
        self._hits = 0
        self._shared = 0
        self._batches = 0
        self._ids_loaded = 0
        self._failed = 0
        self._missing = 0
        self._in_flight = 0

    def __repr__(self) -> str:
        cache = "on" if self._cache is not None else "off"
        return f"<keybatch.loader.Loader cache={cache} in_flight={self._in_flight}>"

    async def load(self, id: K) -> V:
        """Return the value of `id`, loaded with the other ids of its window.

        With the cache on, a cached value is returned at once, and an `id`
        whose `batch_load` call is running already waits for that call.

        Returns:
            What the `batch_load` call's mapping holds for `id`, or the
            cached value.

        Raises:
            KeyError: The mapping had no `id` (only this caller gets it).
            BatchLoadError: `batch_load` raised (`__cause__`) or returned no
                mapping; every caller of the batch gets its own instance.
            keybatch.ProcessorStopped: The loader is closed or closing.

        Cancellation: before its batch closed, the id is withdrawn (it is not
        loaded for this caller). Once the batch's `batch_load` runs, the call
        goes on for the other callers and fills the cache; only this caller's
        value is lost. A load waiting for a call it shares just stops waiting.
        This is always a checkpoint.
        """
        self._loads += 1
        cache = self._cache
        if cache is not None:
            value = cache.get(id, _MISSING)
            if value is not _MISSING:
                self._hits += 1
                await _checkpoint()
                return value  # type: ignore[no-any-return]
            shared = self._inflight.get(id)
            if shared is not None:
                self._shared += 1
                return await self._share(shared, id)
        key = self._key
        if self._max_batch is not None:
            self._count += 1
            if self._count >= self._max_batch:
                self._rotate()
        try:
            batch = await self._proc.run(key, _register, id)
        except keybatch.SaveError as exc:
            raise BatchLoadError(
                id, f"batch_load failed for id {id!r}"
            ) from exc.__cause__
        try:
            return batch.values[id]  # type: ignore[no-any-return]
        except KeyError:
            raise KeyError(id) from None

    async def load_many(self, ids: Iterable[K]) -> list[V]:
        """Return the values of `ids`, in order; all go to the same window.

        Raises:
            KeyError, BatchLoadError: For the first id (in order) that failed,
                as [`load`][keybatch.loader.Loader.load] would; the other ids are
                still loaded.
            keybatch.ProcessorStopped: The loader is closed or closing.

        Cancellation: stops the wait; the ids are still loaded (and cached),
        and nothing is left behind. This is always a checkpoint.
        """
        ids = list(ids)
        values: list[Any] = [None] * len(ids)
        cache = self._cache
        waiting: list[tuple[int, K, keybatch.Pending[_Batch] | _Batch]] = []
        self._loads += len(ids)
        for i, id in enumerate(ids):
            if cache is not None:
                value = cache.get(id, _MISSING)
                if value is not _MISSING:
                    self._hits += 1
                    values[i] = value
                    continue
                shared = self._inflight.get(id)
                if shared is not None:
                    self._shared += 1
                    waiting.append((i, id, shared))
                    continue
            key = self._key
            if self._max_batch is not None:
                self._count += 1
                if self._count >= self._max_batch:
                    self._rotate()
            waiting.append((i, id, self._proc.submit(key, _register, id)))
        if not waiting:
            await _checkpoint()
        for i, id, pending in waiting:
            if isinstance(pending, _Batch):
                values[i] = await self._share(pending, id)
                continue
            try:
                batch = await pending.result()
            except keybatch.SaveError as exc:
                raise BatchLoadError(
                    id, f"batch_load failed for id {id!r}"
                ) from exc.__cause__
            values[i] = self._value(batch, id)
        return values

    def clear(self, id: K) -> None:
        """Forget the cached value of `id`, if any (no-op without a cache).

        A `batch_load` running now does not put its values in the cache.
        """
        if self._cache is not None:
            self._cache.pop(id, None)
            self._inflight.pop(id, None)
            self._generation += 1

    def clear_all(self) -> None:
        """Forget every cached value (no-op without a cache).

        A `batch_load` running now does not put its values in the cache.
        """
        if self._cache is not None:
            self._cache.clear()
            self._inflight.clear()
            self._generation += 1

    def prime(self, id: K, value: V) -> None:
        """Cache `value` for `id` unless a value is cached already (as
        DataLoader does; `clear(id)` first to replace one). No-op without a
        cache."""
        if self._cache is not None:
            self._cache.setdefault(id, value)

    def statistics(self) -> LoaderStatistics:
        """Return a snapshot of the loader's counters."""
        return LoaderStatistics(
            loads=self._loads,
            cache_hits=self._hits,
            shared_loads=self._shared,
            batches=self._batches,
            ids_loaded=self._ids_loaded,
            failed_batches=self._failed,
            missing=self._missing,
            batches_in_flight=self._in_flight,
            cached=0 if self._cache is None else len(self._cache),
        )

    # ------------------------------------------------------------- internals

    async def _share(self, batch: _Batch, id: K) -> V:
        # Wait for a batch_load in flight that holds ``id`` (cache on).
        event = batch.event
        if event is None:
            event = batch.event = anyio.Event()
        await event.wait()
        if batch.error is not None:
            raise BatchLoadError(
                id, f"batch_load failed for id {id!r}"
            ) from batch.error
        return self._value(batch, id)

    def _value(self, batch: _Batch, id: K) -> V:
        try:
            return batch.values[id]  # type: ignore[no-any-return]
        except KeyError:
            raise KeyError(id) from None

    def _rotate(self) -> None:
        # Send new loads to another processor key, whose batch can run while
        # the current one's batch_load is in flight (or is full): prefer an
        # idle key.
        self._count = 0
        n = self._nkeys
        if n == 1:
            return
        busy = self._busy
        key = self._key
        for step in range(1, n + 1):
            candidate = (key + step) % n
            if not busy[candidate]:
                self._key = candidate
                return
        self._key = (key + 1) % n

    async def _new_batch(self, key: int) -> _Batch:
        return _Batch(self._generation)

    async def _save(self, key: int, batch: _Batch) -> None:
        # The save of one processor batch: the batch_load call. The core runs
        # it shielded, so cancelled callers do not cancel it for the others.
        self._busy[key] = True
        self._in_flight += 1
        if key == self._key:
            self._rotate()
        ids = list(batch.ids)
        self._batches += 1
        self._ids_loaded += len(ids)
        inflight = self._inflight if self._cache is not None else None
        if inflight is not None:
            for id in ids:
                inflight[id] = batch
        try:
            values = await self._batch_load(ids)
            if not isinstance(values, Mapping):
                raise TypeError(
                    "batch_load must return a mapping from id to value, got"
                    f" {type(values).__name__}"
                )
            batch.values = values
        except BaseException as exc:
            self._failed += 1
            batch.error = exc
            raise
        finally:
            self._busy[key] = False
            self._in_flight -= 1
            if inflight is not None:
                for id in ids:
                    if inflight.get(id) is batch:
                        del inflight[id]
            if batch.event is not None:
                batch.event.set()
        missing = 0
        cache = self._cache
        if cache is not None and batch.generation == self._generation:
            for id in ids:
                value = values.get(id, _MISSING)
                if value is _MISSING:
                    missing += 1
                else:
                    cache.setdefault(id, value)
        else:
            for id in ids:
                if id not in values:
                    missing += 1
        self._missing += missing


def open_loader(
    batch_load: Callable[[list[K]], Awaitable[Mapping[K, V]]],
    *,
    max_wait: float = 0.0,
    max_batch_size: int | None = None,
    cache: bool = False,
    concurrency: int = 4,
) -> AbstractAsyncContextManager[Loader[K, V]]:
    """Open a batched loader: an async context manager yielding a `Loader`.

    The [`Loader`][keybatch.loader.Loader] it yields is usable from any task.
    Leaving the block waits for the loads already asked for; later calls raise
    [`keybatch.ProcessorStopped`][keybatch.ProcessorStopped]. If the block raises
    or is cancelled, `batch_load` calls in flight still finish (they are
    shielded) and the loads not in one fail with
    [`keybatch.ProcessorStopped`][keybatch.ProcessorStopped].

    Args:
        batch_load: `async batch_load(ids) -> Mapping[id, value]`, given a list
            of distinct ids. An id it leaves out raises KeyError for its callers.
        max_wait: Seconds a window stays open after its first `load`. 0 (the
            default): the window holds the loads made before the loader's task
            got to run, that is, everything asked for in the same tick.
        max_batch_size: At most this many loads per `batch_load` call; a full
            window closes at once. Default: no limit.
        cache: Keep loaded values, per loader
            ([`Loader.clear`][keybatch.loader.Loader.clear],
            [`Loader.clear_all`][keybatch.loader.Loader.clear_all],
            [`Loader.prime`][keybatch.loader.Loader.prime]). Failures and missing
            ids are never cached.
        concurrency: At most this many `batch_load` calls at once. While one
            runs, new loads form the next window on their own.

    Raises:
        TypeError: `batch_load` is not an async callable, or a size is not an
            int.
        ValueError: A negative or non-finite `max_wait`, or a size below 1.
    """
    if not callable(batch_load) or not (
        inspect.iscoroutinefunction(batch_load)
        or inspect.iscoroutinefunction(getattr(batch_load, "__call__", None))  # noqa: B004
    ):
        raise TypeError(f"batch_load must be an async function, got {batch_load!r}")
    if isinstance(max_wait, bool) or not isinstance(max_wait, (int, float)):
        raise TypeError(f"max_wait must be a number of seconds, got {max_wait!r}")
    if not 0 <= max_wait < math.inf:
        raise ValueError(f"max_wait must be finite and >= 0, got {max_wait!r}")
    for name, count in (
        ("max_batch_size", max_batch_size),
        ("concurrency", concurrency),
    ):
        if count is None and name == "max_batch_size":
            continue
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"{name} must be an int, got {count!r}")
        if count < 1:
            raise ValueError(f"{name} must be at least 1, got {count!r}")
    if not isinstance(cache, bool):
        raise TypeError(f"cache must be True or False, got {cache!r}")
    return _open(batch_load, float(max_wait), max_batch_size, concurrency, cache)


@asynccontextmanager
async def _open(
    batch_load: Callable[[list[K]], Awaitable[Mapping[K, V]]],
    max_wait: float,
    max_batch_size: int | None,
    concurrency: int,
    cache: bool,
) -> AsyncIterator[Loader[K, V]]:
    loader: Loader[K, V] = Loader._create(
        batch_load, max_batch_size, concurrency, cache
    )
    async with keybatch.open_processor(
        load=loader._new_batch,
        save=loader._save,
        min_duration=max_wait,
        max_duration=math.inf,  # batch_load is not cut by a batch deadline
        workers=concurrency,
        worker_for_key=_route,
        max_ops=max_batch_size,
    ) as proc:
        loader._proc = proc
        # Let the worker tasks reach their first wait, so that the loads of
        # the block's first tick share a window like any later ones.
        await _checkpoint()
        yield loader
