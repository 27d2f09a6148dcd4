"""PendingLoad: a load enqueued by `load_nowait`, awaited later."""

from __future__ import annotations

from collections.abc import Callable, Generator, Hashable
from typing import Any, Generic, TypeVar, final

from keybatch._util import NoPublicConstructor

from ._window import DONE, Window

__all__ = ["PendingLoad"]

V = TypeVar("V")


@final
class PendingLoad(Generic[V], metaclass=NoPublicConstructor):
    """A load enqueued by [`Loader.load_nowait`][keybatch.loader.Loader.load_nowait].

    Await it (or its [`result`][keybatch.loader.PendingLoad.result]) for the
    value. It is enqueued the moment `load_nowait` returns, so a GraphQL
    resolver can return it and its id still joins the current window. Built by
    the loader, never directly.
    """

    __slots__ = ("_outcome", "_id", "_window", "_value")

    def __init__(
        self,
        outcome: Callable[[Window, Any], V],
        id: Hashable,
        window: Window | None,
        value: Any,
    ) -> None:
        self._outcome = outcome  # the loader's: the value or the exception
        self._id = id
        self._window = window  # None: answered from the cache (`_value`)
        self._value = value

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<keybatch.loader.PendingLoad id={self._id!r} {state}>"

    @property
    def id(self) -> Hashable:
        """The id asked for."""
        return self._id

    def done(self) -> bool:
        """Return True once the outcome is known."""
        return self._window is None or self._window.state == DONE

    async def result(self) -> V:
        """Wait for the id's batch, then return its value.

        Returns:
            The value of the id, as [`Loader.load`][keybatch.loader.Loader.load]
            would return it.

        Raises:
            KeyError: The mapping had no such id.
            LoadFailed: The mapping gave an exception for the id.
            BatchLoadError: `batch_load` raised or returned no mapping.
            keybatch.ProcessorStopped: The loader was torn down before the id
                was loaded.

        Cancellation: cancelling the wait does not withdraw the id; it is still
        loaded, and `result()` can be awaited again. Once the outcome is known
        (see [`done`][keybatch.loader.PendingLoad.done]) it returns at once,
        like a finished future, without yielding to other tasks.
        """
        window = self._window
        if window is None:
            return self._value  # type: ignore[no-any-return]
        if window.state != DONE:
            await window.signal.wait()
        return self._outcome(window, self._id)

    def __await__(self) -> Generator[Any, None, V]:
        return self.result().__await__()
