"""Opening a loader: checking the options, then the worker tasks."""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TypeVar

import anyio

from keybatch._util import reraise

from ._loader import Loader
from ._signal import signal_factory

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["open_loader"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def open_loader(
    batch_load: Callable[[list[K]], Awaitable[Mapping[K, V]]],
    *,
    max_wait: float = 0.0,
    max_batch_size: int | None = None,
    cache: bool = False,
    concurrency: int = 4,
) -> AbstractAsyncContextManager[Loader[K, V]]:
    """Open a batched loader: an async context manager yielding a
    [`Loader`][keybatch.loader.Loader].

    Leaving the block runs the loads already asked for and waits for them;
    later calls raise [`keybatch.ProcessorStopped`][keybatch.ProcessorStopped].
    If the block raises or is cancelled, `batch_load` calls in flight still
    finish (they are shielded) and the loads not in one fail with
    `ProcessorStopped`, including those of tasks outside the block.

    Args:
        batch_load: `async batch_load(ids) -> Mapping[id, value]`, given a list
            of distinct ids in the order they were first asked for. An id it
            leaves out raises `KeyError` for its callers; an exception as an
            id's value raises [`LoadFailed`][keybatch.loader.LoadFailed] for
            that id's callers only. It may itself load through the loader.
        max_wait: Seconds a window stays open after its first `load`. 0 (the
            default): the window holds the loads made before a worker got to
            run, that is, everything asked for in the same tick.
        max_batch_size: At most this many distinct ids per `batch_load` call;
            a full window closes at once. Default: no limit.
        cache: Keep loaded values, per loader
            ([`clear`][keybatch.loader.Loader.clear],
            [`clear_all`][keybatch.loader.Loader.clear_all],
            [`prime`][keybatch.loader.Loader.prime]). Failures and missing ids
            are never cached.
        concurrency: At most this many `batch_load` calls at once (plus, for
            loads made from inside `batch_load`, one helper call per window
            that no worker is free to run). While one runs, new loads form the
            next window on their own.

    Raises:
        TypeError: `batch_load` is not an async callable, or a size is not an
            int.
        ValueError: A negative or non-finite `max_wait`, or a size below 1.
    """
    if not callable(batch_load) or not _is_async(batch_load):
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


def _is_async(fn: object) -> bool:
    # async functions, and objects whose __call__ is one
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004
    )


@asynccontextmanager
async def _open(
    batch_load: Callable[[list[K]], Awaitable[Mapping[K, V]]],
    max_wait: float,
    max_batch_size: int | None,
    concurrency: int,
    cache: bool,
) -> AsyncIterator[Loader[K, V]]:
    body_error: BaseException | None = None
    loader: Loader[K, V] = Loader._create(
        batch_load,
        max_wait,
        max_batch_size,
        cache,
        signal_factory(),
        _not_open,
        _not_open,
    )
    try:
        async with anyio.create_task_group() as tg:
            loader._spawn = tg.start_soon
            loader._abort = tg.cancel_scope.cancel
            for _ in range(concurrency):
                await tg.start(loader._work)  # each parked before the block runs
            try:
                yield loader
            except BaseException as exc:
                body_error = exc
                loader._stop()
                raise
            try:
                await loader._drain()
            finally:
                loader._stop()  # the workers end
    except BaseExceptionGroup as group:
        if loader._fatal is not None:
            raise loader._fatal from None  # KeyboardInterrupt & co., as they are
        if body_error is None or list(group.exceptions) != [body_error]:
            raise
        # The block's own exception comes out as it went in, not in a group.
        del group
        reraise(body_error)
    finally:
        loader._stop()
    if loader._fatal is not None:
        raise loader._fatal  # KeyboardInterrupt & co. come out as they are


def _not_open(*args: object) -> None:
    raise RuntimeError("keybatch.loader: the loader is not open")
