"""Pending: one accepted operation, its place in a batch, and its outcome."""

from __future__ import annotations

from asyncio import _get_running_loop
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar, final

from trio import Event as _TrioEvent

from ._errors import LoadError, ProcessorStopped, SaveError
from ._util import NoPublicConstructor, checkpoint, foreign_loop_error

if TYPE_CHECKING:
    from ._batch import Group

__all__ = ["Pending"]

T = TypeVar("T", covariant=True)

# Slot states. Only QUEUED may be withdrawn; the rest are outcomes, readable once
# the slot's group is finished.
QUEUED = 0
WITHDRAWN = 1
VALUE = 2
RAISED = 3
LOAD_FAILED = 4
SAVE_FAILED = 5
ABORTED = 6


@final
class Pending(Generic[T], metaclass=NoPublicConstructor):
    """An operation accepted by :meth:`Processor.submit`, and later its outcome.

    Built by the processor, never directly.
    """

    __slots__ = ("_op", "_args", "_kwargs", "_state", "_outcome", "_group")

    _op: Callable[..., Any] | None
    _args: tuple[Any, ...]
    _kwargs: dict[str, Any]
    _state: int
    _outcome: Any
    _group: Group

    def __init__(
        self,
        op: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        group: Group,
    ) -> None:
        self._op = op
        self._args = args
        self._kwargs = kwargs
        self._state = QUEUED
        self._outcome = None
        self._group = group

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<keybatch.Pending key={self._group.state.key!r} {state}>"

    def done(self) -> bool:
        """Return True once the outcome is known: the batch finished (saved or
        failed), or the processor was torn down before the operation was applied."""
        return self._group.finished

    async def result(self) -> T:
        """Wait for the batch that holds the operation, then return what it returned.

        Returns:
            The operation's return value, once its batch was saved.

        Raises:
            Exception: Whatever the operation raised (that object itself).
            LoadError: The batch's load failed; the operation was not applied.
            SaveError: The batch's save failed; the effect was not saved.
            ProcessorStopped: The processor was torn down (cancelled) before the
                operation was applied.

        Cancellation: cancelling this wait does not withdraw the operation; it
        stays queued, is applied and saved, and ``result()`` can be awaited again.
        This is always a checkpoint, even when the outcome is already known.
        """
        group = self._group
        if group.finished:
            await checkpoint()
        else:
            event = group.event
            if type(event) is _TrioEvent and _get_running_loop() is not None:
                raise foreign_loop_error()  # waiting would corrupt trio's state
            await event.wait()
        return self._unwrap()

    def _unwrap(self) -> T:
        state = self._state
        if state == VALUE:
            return self._outcome  # type: ignore[no-any-return]
        if state == RAISED:
            raise self._outcome
        key = self._group.state.key
        if state == LOAD_FAILED:
            raise LoadError(key, f"load of key {key!r} failed") from self._outcome
        if state == SAVE_FAILED:
            raise SaveError(key, f"save of key {key!r} failed") from self._outcome
        if state == ABORTED:
            raise ProcessorStopped(
                f"the processor was torn down before the operation on key {key!r}"
                " was applied"
            ) from self._outcome
        raise RuntimeError("keybatch: result read before the batch finished")

    def _withdraw(self) -> None:
        # Called by a cancelled caller (or the group) while the slot is QUEUED.
        self._state = WITHDRAWN
        self._op = None
        self._args = ()
        self._kwargs = {}
        self._group.withdraw_one()
