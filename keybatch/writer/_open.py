"""Opening a writer: checking the options, then the writer's tasks."""

from __future__ import annotations

import asyncio
import inspect
import math
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import anyio

from keybatch._util import reraise

from ._records import FlushReport
from ._retry import RetryPolicy, exponential_backoff, retry_transient
from ._writer import Writer

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

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
    close_timeout: float | None = None,
    max_failed_ids: int = 10_000,
    max_results: int = 10_000,
) -> AbstractAsyncContextManager[Writer[T]]:
    """Open a buffered writer: an async context manager yielding a
    [`Writer`][keybatch.writer.Writer].

    Leaving the block flushes everything accepted (held items too) and waits
    for it, within `close_timeout` if given. If the block raises or is
    cancelled instead, sink calls in progress finish (within `close_timeout`),
    retries end (their items fail with their last error), and the rest is
    dropped: counted in `dropped_items`, passed to `on_error` and listed by
    [`results`][keybatch.writer.Writer.results] with a
    [`keybatch.ProcessorStopped`][keybatch.ProcessorStopped]. Tasks outside the
    block waiting in `write_sync` or `flush` are told, never left hanging.

    If the sink raises an exception that is not an `Exception`
    (`KeyboardInterrupt`, `SystemExit`), the items of that call fail with it
    as their cause, the writer is torn down as if its block were cancelled,
    and the block re-raises that exception by itself (not in a group).

    Args:
        sink: `async sink(key, items)`: writes a list of items in one call.
            It may return the number of bytes it sent (an int), summed in
            `bytes_written`, or a [`Partial`][keybatch.writer.Partial] naming
            the items the endpoint rejected; anything else is ignored.
        batch_size: Flush a key's buffer once it holds this many items.
        flush_interval: Seconds after a key's first buffered item when its buffer
            is flushed anyway. Items that arrive while the key's previous flush
            is in progress wait for it to end, then `flush_interval`.
        jitter: Up to this many seconds added to `flush_interval`, drawn anew
            (uniformly in `[0, jitter]`) every time a key's interval starts, so
            that keys (and writers) that start together flush apart.
        concurrent_flushes: At most this many sink calls at once, for any
            keys: a key whose buffer is due takes the next free slot. A flush
            waiting to retry, or an item held for its dependencies, holds no
            slot.
        max_buffered: Bound on unfinished items (default `10 * batch_size`):
            `write` waits for room, `write_nowait` raises
            [`keybatch.Overloaded`][keybatch.Overloaded].
        max_retries: Retries of a failed sink call (or of the items a
            `Partial` rejected) that `retry_on` accepts.
        retry_on: `retry_on(exc) -> bool`: is this failure transient? Default:
            OSError and TimeoutError are.
        backoff: `backoff(retry) -> seconds` to wait before retry number
            `retry` (1, 2, ...), at most `MAX_BACKOFF` (300 s). Default
            [`exponential_backoff()`][keybatch.writer.exponential_backoff]:
            0.1 s doubling up to 10 s, with jitter. The wait holds no slot and
            does not block new writes.
        on_error: `on_error(key, items, exc)`, a plain callable, for items
            that were not written: `exc` is the sink's last exception, the one
            a `Partial` gave them, a
            [`DependencyFailed`][keybatch.writer.DependencyFailed], a
            [`WriteError`][keybatch.writer.WriteError] for a call cut short,
            or a [`keybatch.ProcessorStopped`][keybatch.ProcessorStopped] for
            items dropped when the writer stopped. Exceptions it raises are
            logged.
        on_flush: `on_flush(report)`, a plain callable, after each flush,
            successful or not, with a [`FlushReport`][keybatch.writer.FlushReport].
            Exceptions it raises are logged.
        close_timeout: Seconds that closing may take, from the moment it
            starts (the block ends, raises or is cancelled, or
            [`aclose`][keybatch.writer.Writer.aclose]). Past it, sink calls in
            progress are cancelled (their items fail with a `WriteError`
            whose `may_have_landed` is True) and what is left is dropped.
            None (the default): no bound; a hung sink keeps the block open.
        max_failed_ids: How many failed ids the writer remembers (the oldest
            are forgotten first) to fail later items that name them in
            `after=`. A forgotten id counts as written.
        max_results: How many failed items
            [`results`][keybatch.writer.Writer.results] keeps (the oldest go
            first; the count of those left out is kept).

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
    for name, value in (
        ("flush_interval", flush_interval),
        ("jitter", jitter),
        ("close_timeout", 0.0 if close_timeout is None else close_timeout),
    ):
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
        ("max_failed_ids", max_failed_ids, 0),
        ("max_results", max_results, 0),
    ):
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"{name} must be an int, got {count!r}")
        if count < least:
            raise ValueError(f"{name} must be at least {least}, got {count!r}")
    assert max_buffered is not None
    return _open(
        lambda: Writer._create(
            sink,
            batch_size,
            float(flush_interval),
            float(jitter),
            concurrent_flushes,
            max_buffered,
            RetryPolicy(
                max_retries,
                retry_on if retry_on is not None else retry_transient,
                backoff if backoff is not None else exponential_backoff(),
            ),
            on_error,
            on_flush,
            None if close_timeout is None else float(close_timeout),
            max_failed_ids,
            max_results,
        )
    )


def _is_async(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004  (objects with async __call__)
    )


def _backend() -> tuple[Callable[[], float], Callable[[], Awaitable[object]]]:
    """The running loop's clock and cheapest checkpoint (anyio's own cost
    several times more on asyncio: they look the backend up on every call)."""
    trio = sys.modules.get("trio")  # not imported: not running (asyncio path)
    if trio is not None:
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
        else:
            return trio.current_time, trio.lowlevel.checkpoint
    loop = asyncio.get_running_loop()
    return loop.time, _asyncio_checkpoint


async def _asyncio_checkpoint() -> None:
    await asyncio.sleep(0)


@asynccontextmanager
async def _open(create: Callable[[], Writer[Any]]) -> AsyncIterator[Writer[Any]]:
    writer = create()
    writer._clock, writer._checkpoint = _backend()
    writer._cancelled = anyio.get_cancelled_exc_class()
    body_error: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            writer._spawn = tg.start_soon
            writer._cancel_all = tg.cancel_scope.cancel
            tg.start_soon(writer._run_timer)
            try:
                yield writer
            except BaseException as exc:
                body_error = exc
                writer._abort()
                raise
            await writer.aclose()  # nothing to do if the block closed it
            tg.cancel_scope.cancel()  # the timer task
    except BaseExceptionGroup as group:
        if writer._fatal is not None:
            raise writer._fatal from None
        if body_error is None or list(group.exceptions) != [body_error]:
            raise
        # The block's own exception comes out as it went in, not in a group.
        del group
        reraise(body_error)
    finally:
        writer._stop()
    if writer._fatal is not None:
        raise writer._fatal  # KeyboardInterrupt & co. come out as they are
