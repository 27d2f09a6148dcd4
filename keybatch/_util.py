"""Small helpers shared by the private modules."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import anyio
import trio

__all__ = ["NoPublicConstructor", "backend_primitives", "is_async_callable"]

ASYNC_FLAGS = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


class NoPublicConstructor(type):
    """Metaclass of classes that only a keybatch factory may build."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"{cls.__module__}.{cls.__qualname__} has no public constructor"
        )

    def _create(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, **kwargs)


def is_async_callable(obj: object) -> bool:
    """Return True if calling ``obj`` gives a coroutine (functions, partials, methods,
    and objects whose ``__call__`` is ``async def``)."""
    code = getattr(obj, "__code__", None)
    if code is not None:
        return bool(code.co_flags & ASYNC_FLAGS)
    if inspect.iscoroutinefunction(obj):
        return True
    return callable(obj) and inspect.iscoroutinefunction(type(obj).__call__)


def backend_primitives() -> tuple[
    Callable[[], Any], Callable[[], float], Callable[..., Any]
]:
    """Return ``(new_event, current_time, cancel_scope)`` for the running loop.

    Under trio these are trio's own (anyio's wrappers cost about 25% more per
    event cycle, and more per cancel scope); under asyncio, asyncio.Event, the
    loop's clock and anyio's CancelScope, which cancels an asyncio.Event wait like
    any other await. Neither event's ``wait`` checkpoints when the event is set
    already: callers that may find it set checkpoint themselves.
    """
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        loop = asyncio.get_running_loop()
        return asyncio.Event, loop.time, anyio.CancelScope
    else:
        return trio.Event, trio.current_time, trio.CancelScope


# Re-exported so the rest of the package names one checkpoint.
checkpoint = anyio.lowlevel.checkpoint
