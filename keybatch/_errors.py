"""The exceptions keybatch raises.

Every waiting caller gets its own exception object: a failed load or save is
raised in each caller as a fresh [`LoadError`][keybatch.LoadError] or
[`SaveError`][keybatch.SaveError] whose `__cause__` is the original exception,
never one instance shared by many tasks.

Every exception here survives `pickle` and `copy.copy` with its type, its
attributes and its message (multiprocessing, `to_process`, pytest-xdist).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

__all__ = [
    "BatchError",
    "Conflict",
    "KeyBusy",
    "KeybatchError",
    "LoadError",
    "Overloaded",
    "ProcessorStopped",
    "SaveError",
]


class KeybatchError(Exception):
    """Base class of every exception keybatch defines."""


class BatchError(KeybatchError):
    """A batch of one key failed as a whole; `__cause__` says why.

    Attributes:
        key: The key whose batch failed.
    """

    key: Hashable

    def __init__(self, key: Hashable, message: str) -> None:
        super().__init__(message)
        self.key = key

    def __reduce__(self) -> tuple[Any, ...]:
        # The default would call cls(message) and lose the key.
        return (type(self), (self.key, str(self)), self.__dict__)


class LoadError(BatchError):
    """The batch's load raised or passed the batch deadline.

    No operation of the batch was applied. `__cause__` is the exception the load
    raised, or a `TimeoutError` when it passed `start + max_duration`.
    """


class SaveError(BatchError):
    """The batch's save did not complete: its outcome may be unknown.

    The operation was applied to the loaded resource, then the save raised, was
    refused, or was interrupted. Whether the write landed is in
    `may_have_landed`:

    - `False`: the store refused before it wrote: the save raised
      [`Conflict`][keybatch.Conflict] more than `max_replays` times in a row (or
      once, and the processor was torn down before it could replay). The
      effect is not stored; retrying is safe.
    - `True`: the save began and was interrupted (the batch deadline, a
      cancellation, or an exception other than `Conflict` from the store). The
      write may or may not have landed: a retry must be idempotent (an
      idempotency key saved with the resource, say) or it may apply twice.

    `__cause__` is the exception the save raised, a `TimeoutError` for the
    deadline, or the last `Conflict`.

    Attributes:
        key: The key whose batch failed.
        may_have_landed: Whether the write may have reached the store.
    """

    may_have_landed: bool

    def __init__(
        self, key: Hashable, message: str, *, may_have_landed: bool = True
    ) -> None:
        super().__init__(key, message)
        self.may_have_landed = may_have_landed


class Conflict(KeybatchError):
    """Raised by `save` when the stored version moved since `load` read it.

    Another process saved first. The batch then loads again and re-applies its
    operations in the same order, up to `max_replays` times (see
    [`open_processor`][keybatch.open_processor]); past that, every caller gets a
    [`SaveError`][keybatch.SaveError] with `may_have_landed=False` chained to the
    last `Conflict`.
    """


class KeyBusy(KeybatchError):
    """[`Processor.exclusive`][keybatch.Processor.exclusive] could not take its keys.

    Raised at once with `wait=False` when a key is busy, or after `timeout`
    seconds of waiting. Nothing is held when it is raised.

    Attributes:
        keys: The keys that were busy, in the order they were given.
    """

    keys: tuple[Hashable, ...]

    def __init__(self, keys: Iterable[Hashable], message: str | None = None) -> None:
        keys = tuple(keys)
        if message is None:
            message = f"keys are busy: {', '.join(repr(k) for k in keys)}"
        super().__init__(message)
        self.keys = keys

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.keys, str(self)), self.__dict__)


class ProcessorStopped(KeybatchError):
    """The processor is stopped, or was torn down before the operation was applied."""


class Overloaded(KeybatchError):
    """`max_pending` accepted operations are unfinished; nothing was enqueued."""
