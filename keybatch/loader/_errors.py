"""The loader's exceptions: a batch that failed, or one id that did."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import keybatch

__all__ = ["BatchLoadError", "LoadFailed"]


class BatchLoadError(keybatch.KeybatchError):
    """The ``batch_load`` call that held this id raised, or returned no mapping.

    Every caller gets an instance of its own; ``__cause__`` is what
    ``batch_load`` raised.

    Attributes:
        id: The id this caller asked for.
    """

    def __init__(self, id: Hashable, message: str) -> None:
        super().__init__(message)
        self.id = id

    def __reduce__(self) -> tuple[Any, ...]:
        # args holds only the message: rebuild from (id, message) instead.
        return (type(self), (self.id, str(self)), self.__dict__.copy())


class LoadFailed(BatchLoadError):
    """``batch_load`` gave an exception as this id's value: that id failed alone.

    Its callers each get an instance of their own, whose ``__cause__`` is the
    exception in the mapping. The other ids of the batch are unaffected, and the
    failure is not cached.

    Attributes:
        id: The id this caller asked for.
    """
