"""Opening a writer: checking the options, and the processor under the writer."""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import keybatch

from ._buffer import new_buffer
from ._records import FlushReport
from ._retry import RetryPolicy, exponential_backoff, retry_transient
from ._writer import Writer

__all__ = ["open_writer"]

T = TypeVar("T")


def open_writer(
    sink: Callable[[Any, list[T]], Awaitable[object]],
    *,
    batch_size: int = 5000,
    flush_interval: float = 1.0,
    jitter: float = 0.0,
    concurrent_flushes: int = 2,
    max_buffered: int | None = None,
    max_retries: int = 3,
    retry_on: Callable[[BaseException], bool] | None = None,
    backoff: Callable[[int], float] | None = None,
    on_error: Callable[[Any, list[T], BaseException], object] | None = None,
    on_flush: Callable[[FlushReport], object] | None = None,
) -> AbstractAsyncContextManager[Writer[T]]:
    """Open a buffered writer: an async context manager yielding a `Writer`.

    Leaving the block flushes everything buffered (held items too) and waits for
    it: nothing accepted is lost. If the block raises or is cancelled instead,
    flushes in progress finish (retries included) and the rest is dropped
    (counted in `dropped_items`).

    Args:
        sink: `async sink(key, items)`: writes a list of items in one call.
            It may return the number of bytes it sent (an int), summed in
            `bytes_written`; anything else is ignored.
        batch_size: Flush a key's buffer once it holds this many items.
        flush_interval: Seconds after a key's first buffered item when its buffer
            is flushed anyway. Items that arrive while the key's previous flush
            is in progress wait for it to end, then `flush_interval`.
        jitter: Up to this many seconds are added to `flush_interval`: a random
            amount drawn once when the writer opens (so that many writers
            started together do not flush together); see
            [`Writer.flush_interval`][keybatch.writer.Writer.flush_interval].
        concurrent_flushes: At most this many sink calls at once. Each key is
            served by one of that many flush tasks, picked by
            [`keybatch.worker_for_key`][keybatch.worker_for_key] for str and
            bytes keys, by `hash(key)` for others: a slow or retrying flush
            delays the other keys of its task.
        max_buffered: Bound on buffered items (default `10 * batch_size`):
            `write` waits for room, `write_nowait` raises
            [`keybatch.Overloaded`][keybatch.Overloaded].
        max_retries: Retries of a failed sink call that `retry_on` accepts.
        retry_on: `retry_on(exc) -> bool`: is this failure transient? Default:
            OSError and TimeoutError are.
        backoff: `backoff(retry) -> seconds` to wait before retry number
            `retry` (1, 2, ...). Default `exponential_backoff()`: 0.1 s
            doubling up to 10 s, with jitter. The wait does not block new writes.
        on_error: `on_error(key, items, exc)`, a plain callable, for items that
            failed for good: `exc` is the sink's last exception, or a
            [`DependencyFailed`][keybatch.writer.DependencyFailed]. Exceptions it
            raises are logged.
        on_flush: `on_flush(report)`, a plain callable, after each flush,
            successful or not, with a
            [`FlushReport`][keybatch.writer.FlushReport]. Exceptions it raises are
            logged.

    Raises:
        TypeError: `sink` is not an async callable, a hook is not a plain
            callable, or a size is not an int.
        ValueError: A negative or non-finite duration, or a size below its minimum.
    """
    if not callable(sink) or not _is_async(sink):
        raise TypeError(f"sink must be an async function, got {sink!r}")
    for name, fn in (
        ("retry_on", retry_on),
        ("backoff", backoff),
        ("on_error", on_error),
        ("on_flush", on_flush),
    ):
        if fn is not None and (not callable(fn) or _is_async(fn)):
            raise TypeError(f"{name} must be a plain (non-async) callable, got {fn!r}")
    for name, value in (("flush_interval", flush_interval), ("jitter", jitter)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number of seconds, got {value!r}")
        if not 0 <= value < math.inf:
            raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    if max_buffered is None and isinstance(batch_size, int):
        max_buffered = 10 * batch_size
    for name, count, least in (
        ("batch_size", batch_size, 1),
        ("concurrent_flushes", concurrent_flushes, 1),
        ("max_buffered", max_buffered, 1),
        ("max_retries", max_retries, 0),
    ):
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"{name} must be an int, got {count!r}")
        if count < least:
            raise ValueError(f"{name} must be at least {least}, got {count!r}")
    assert max_buffered is not None
    interval = float(flush_interval) + (random.uniform(0, jitter) if jitter else 0.0)
    return _open(
        sink,
        interval,
        batch_size,
        concurrent_flushes,
        max_buffered,
        RetryPolicy(
            max_retries,
            retry_on if retry_on is not None else retry_transient,
            backoff if backoff is not None else exponential_backoff(),
        ),
        on_error,
        on_flush,
    )


def _is_async(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004  (objects with async __call__)
    )


@asynccontextmanager
async def _open(
    sink: Callable[[Any, list[T]], Awaitable[object]],
    interval: float,
    batch_size: int,
    concurrent_flushes: int,
    max_buffered: int,
    retry: RetryPolicy,
    on_error: Callable[[Any, list[T], BaseException], object] | None,
    on_flush: Callable[[FlushReport], object] | None,
) -> AsyncIterator[Writer[T]]:
    writer: Writer[T] = Writer._create(
        sink,
        interval,
        max_buffered,
        retry,
        on_error,
        on_flush,
    )
    try:
        async with keybatch.open_processor(
            load=new_buffer,
            save=writer._save,
            min_duration=interval,
            max_duration=math.inf,  # retries must not be cut by a batch deadline
            workers=concurrent_flushes,
            worker_for_key=_route,
            max_ops=batch_size,
        ) as proc:
            writer._proc = proc
            try:
                yield writer
            except BaseException:
                writer._closing = True
                writer._room.release_all()
                raise
            await writer._drain()
    finally:
        writer._torn_down()


def _route(key: Hashable, workers: int) -> int:
    # str and bytes keys: keybatch's stable mmh3 routing; other keys: hash().
    if key is None:
        return 0
    if isinstance(key, (str, bytes)):
        return keybatch.worker_for_key(key, workers)
    return hash(key) % workers
