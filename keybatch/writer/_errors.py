"""The writer's exceptions: an item that was not written, and why."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import keybatch

__all__ = ["DependencyFailed", "WriteError"]


class WriteError(keybatch.BatchError):
    """An item was not written: its flush failed for good, or was cut short.

    `__cause__` is the exception of the sink's last attempt (or the exception
    a [`Partial`][keybatch.writer.Partial] result gave for this item).

    Attributes:
        key: The key (buffer) the item was written to.
        attempts: Sink calls that held the item.
        may_have_landed: True when the last sink call was cut short (by the
            writer's `close_timeout`) before it returned: the sink may have
            written the item anyway.
    """

    def __init__(
        self,
        key: Hashable,
        message: str,
        *,
        attempts: int = 0,
        may_have_landed: bool = False,
    ) -> None:
        super().__init__(key, message)
        self.attempts = attempts
        self.may_have_landed = may_have_landed

    def __reduce__(self) -> tuple[Any, ...]:
        # args holds the message only: rebuild from the key and the message,
        # then restore the other attributes.
        return (_rebuild, (type(self), self.key, str(self)), self.__dict__.copy())


class DependencyFailed(WriteError):
    """An item was not written because an item it waited for was not written.

    Attributes:
        key: The key the dependent item was written to.
        dependency: The `id` of the item it waited for (named in `after=`).
    """

    def __init__(self, key: Hashable, message: str, dependency: Hashable) -> None:
        super().__init__(key, message)
        self.dependency = dependency


def _rebuild(cls: type[WriteError], key: Hashable, message: str) -> WriteError:
    # Unpickling and copying: build without __init__'s own arguments, which
    # differ by class; the attributes come back with the state.
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.key = key
    return error
