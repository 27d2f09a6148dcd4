"""Small helpers shared by the package: factories, callables, public names.

`NoPublicConstructor` and `publish` are the one internal module that the
companion packages (`keybatch.writer`, `keybatch.loader`, `keybatch.testing`)
may use besides the public API.
"""

from __future__ import annotations

import contextlib
import inspect
import typing
from typing import Any, NoReturn

__all__ = [
    "ASYNC_FLAGS",
    "NoPublicConstructor",
    "is_async_callable",
    "publish",
    "reraise",
]

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
    """Return True if calling `obj` gives a coroutine (functions, partials, methods,
    and objects whose `__call__` is `async def`)."""
    code = getattr(obj, "__code__", None)
    if code is not None:
        return bool(code.co_flags & ASYNC_FLAGS)
    if inspect.iscoroutinefunction(obj):
        return True
    return callable(obj) and inspect.iscoroutinefunction(type(obj).__call__)


def publish(namespace: dict[str, Any]) -> None:
    """Make the names in `namespace["__all__"]` say they live in that module.

    As trio does: `keybatch.Processor.__module__` is `"keybatch"`, not
    `"keybatch._processor"`. Classes first get their annotations resolved in the
    module that defined them, so `typing.get_type_hints` keeps working on them
    after the rewrite (the public module's namespace would not resolve names such
    as `Hashable` that a postponed annotation refers to).
    """
    public = namespace["__name__"]
    for name in namespace["__all__"]:
        obj = namespace.get(name)
        home = getattr(obj, "__module__", None)
        if not isinstance(home, str) or home == public:
            continue
        if not home.startswith(public.split(".")[0] + "."):
            continue  # not ours
        if not home.rpartition(".")[2].startswith("_"):
            continue  # already a public module
        if isinstance(obj, type):
            _resolve_annotations(obj)
        with contextlib.suppress(AttributeError, TypeError):  # builtins
            obj.__module__ = public


def _resolve_annotations(cls: type) -> None:
    for klass in cls.__mro__:
        own = klass.__dict__.get("__annotations__")  # noqa: RUF063 - own only
        if not own or not any(isinstance(v, str) for v in own.values()):
            continue
        hints = typing.get_type_hints(klass)
        with contextlib.suppress(AttributeError, TypeError):  # builtins
            klass.__annotations__ = {k: hints.get(k, v) for k, v in own.items()}


def reraise(exc: BaseException) -> NoReturn:
    """Raise `exc` again as it went in: its `__context__` and
    `__suppress_context__` are kept (raising it inside an `except` block would
    overwrite them). Used where an internal task group wrapped the user's own
    exception in an exception group.
    """
    context, suppress = exc.__context__, exc.__suppress_context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        exc.__suppress_context__ = suppress
        del exc
