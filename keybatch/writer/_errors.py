"""The writer's exceptions: an item that was not written, and why."""

from __future__ import annotations

from collections.abc import Hashable

import keybatch

__all__ = ["DependencyFailed", "WriteError"]


class WriteError(keybatch.BatchError):
    """An item was not written: the flush that held it failed for good.

    `__cause__` is the exception of the sink's last attempt.

    Attributes:
        key: The key (buffer) the item was written to.
    """


class DependencyFailed(WriteError):
    """An item was not written because an item it waited for was not written.

    Attributes:
        key: The key the dependent item was written to.
        dependency: The `id` of the item it waited for (named in `after=`).
    """

    def __init__(self, key: Hashable, message: str, dependency: Hashable) -> None:
        super().__init__(key, message)
        self.dependency = dependency
