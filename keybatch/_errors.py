"""The exceptions keybatch raises.

Every waiting caller gets its own exception object: a failed load or save is
raised in each caller as a fresh :class:`LoadError` or :class:`SaveError` whose
``__cause__`` is the original exception, never one instance shared by many tasks.
"""

from __future__ import annotations

from collections.abc import Hashable

__all__ = [
    "BatchError",
    "KeybatchError",
    "LoadError",
    "Overloaded",
    "ProcessorStopped",
    "SaveError",
]


class KeybatchError(Exception):
    """Base class of every exception keybatch defines."""


class BatchError(KeybatchError):
    """A batch of one key failed as a whole; ``__cause__`` says why.

    Attributes:
        key: The key whose batch failed.
    """

    def __init__(self, key: Hashable, message: str) -> None:
        super().__init__(message)
        self.key = key


class LoadError(BatchError):
    """The batch's load raised or passed the batch deadline.

    No operation of the batch was applied. ``__cause__`` is the exception the load
    raised, or a :class:`TimeoutError` when it passed ``start + max_duration``.
    """


class SaveError(BatchError):
    """The batch's save raised or passed the batch deadline.

    The operation was applied to the loaded resource, but that resource was not
    saved: its effect is lost and the next batch loads the stored state again.
    ``__cause__`` is the exception the save raised, or a :class:`TimeoutError`.
    """


class ProcessorStopped(KeybatchError):
    """The processor is stopped, or was torn down before the operation was applied."""


class Overloaded(KeybatchError):
    """``max_pending`` accepted operations are unfinished; nothing was enqueued."""
