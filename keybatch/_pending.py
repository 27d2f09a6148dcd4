"""Pending: one accepted operation (a slot in its batch), and later its outcome."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import Context
from typing import Any, Generic, TypeVar, final

from ._errors import LoadError, ProcessorStopped, SaveError
from ._model import Batch, SlotState
from ._util import NoPublicConstructor

__all__ = ["Pending", "deliver", "outcome_error"]

T = TypeVar("T", covariant=True)

QUEUED = SlotState.QUEUED
VALUE = SlotState.VALUE
RAISED = SlotState.RAISED


@final
class Pending(Generic[T], metaclass=NoPublicConstructor):
    """An operation accepted by [`Processor.submit`][keybatch.Processor.submit],
    and later its outcome.

    Built by the processor, never directly.
    """

    __slots__ = (
        "_op",
        "_args",
        "_kwargs",
        "_ctx",
        "_state",
        "_outcome",
        "_batch",
        "_waiter",
    )

    _op: Callable[..., Any] | None
    _args: tuple[Any, ...]
    _kwargs: dict[str, Any] | None  # None: no arguments beyond the resource
    _ctx: Context | None
    _state: SlotState
    _outcome: Any
    _batch: Batch
    _waiter: Any  # what the parked `run` caller waits on (backend's), or None

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<keybatch.Pending key={self._batch.state.key!r} {state}>"

    def done(self) -> bool:
        """Return True once the outcome is known: the batch finished (saved or
        failed), or the processor was torn down before the operation was applied."""
        return self._batch.finished

    async def result(self) -> T:
        """Wait for the batch that holds the operation, then return what it returned.

        Returns:
            The operation's return value, once its batch was saved.

        Raises:
            Exception: Whatever the operation raised (that object itself).
            LoadError: The batch's load failed; the operation was not applied.
            SaveError: The batch's save failed or was interrupted; see
                `SaveError.may_have_landed`.
            ProcessorStopped: The processor was torn down (cancelled) before the
                operation was applied.

        Cancellation: cancelling this wait does not withdraw the operation; it
        stays queued, is applied and saved, and `result()` can be awaited again.
        This is always a checkpoint, even when the outcome is already known.
        """
        batch = self._batch
        await batch.state.worker.engine.backend.wait_result(self)
        if self._state is VALUE:
            return self._outcome  # type: ignore[no-any-return]
        error = outcome_error(self)
        try:
            raise error
        finally:
            # The traceback holds this frame: drop the references that would
            # make a cycle through it (outcome's Error.unwrap does the same).
            del error, self, batch


def outcome_error(slot: Pending[Any]) -> BaseException:
    """The exception a caller of a failed slot raises: its own object, chained."""
    state = slot._state
    if state is RAISED:
        return slot._outcome  # type: ignore[no-any-return]
    key = slot._batch.state.key
    cause = slot._outcome
    error: BaseException
    if state is SlotState.LOAD_FAILED:
        error = LoadError(key, f"load of key {key!r} failed")
    elif state is SlotState.SAVE_FAILED:
        landed = cause.may_have_landed
        error = SaveError(
            key,
            f"save of key {key!r} "
            + ("failed; the write may have landed" if landed else "was refused"),
            may_have_landed=landed,
        )
        cause = cause.cause
    elif state is SlotState.ABORTED:
        error = ProcessorStopped(
            f"the processor was torn down before the operation on key {key!r}"
            " was applied"
        )
    else:
        return RuntimeError("keybatch: result read before the batch finished")
    error.__cause__ = cause
    return error


def deliver(slot: Pending[Any]) -> Any:
    """Return the value of a finished slot to its `run` caller, or raise its error.

    The caller owns an operation's exception from here on: the slot lets go of
    it, and this frame keeps no reference, so no cycle runs through either.
    """
    state = slot._state
    if state is VALUE:
        return slot._outcome
    error = outcome_error(slot)
    if state is RAISED:
        slot._outcome = None
    try:
        raise error
    finally:
        del error, slot
