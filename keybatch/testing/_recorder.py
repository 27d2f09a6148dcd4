"""The recorder of calls, applications, outcomes, loads and saves: `recorder`."""

from __future__ import annotations

import copy
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, final

import anyio
import anyio.lowlevel

import keybatch
from keybatch._util import NoPublicConstructor

from ._history import (
    APPLY,
    CALL,
    EXTERNAL,
    HELD,
    LOAD,
    LOAD_FAILED,
    LOADED,
    OUTCOME,
    RELEASED,
    SAVE,
    SAVE_FAILED,
    SAVED,
    SECTION,
    WRITE,
    Event,
    HistoryViolation,
    _check,
)

if TYPE_CHECKING:
    from ._store import MemoryStore

__all__ = ["Recorder", "recorder"]

R = TypeVar("R")
T = TypeVar("T")
P = ParamSpec("P")


@final
class Recorder(metaclass=NoPublicConstructor):
    """Logs calls, applications, outcomes, loads and saves.

    Built by [`recorder`][keybatch.testing.recorder]. Route operations through
    [`run`][keybatch.testing.Recorder.run] /
    [`submit`][keybatch.testing.Recorder.submit] (or pass
    [`wrap`][keybatch.testing.Recorder.wrap]'s result to `processor.run`) and give
    the processor [`wrap_load`][keybatch.testing.Recorder.wrap_load] /
    [`wrap_save`][keybatch.testing.Recorder.wrap_save] of your store; then
    [`check`][keybatch.testing.Recorder.check].

    Attributes:
        events: The log, in the order things happened.
    """

    __slots__ = ("events", "_ops", "_unobserved")

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._ops = 0
        self._unobserved: dict[int, keybatch.Pending[Any]] = {}

    def __repr__(self) -> str:
        return f"<keybatch.testing.Recorder events={len(self.events)} ops={self._ops}>"

    def _log(
        self,
        key: Hashable,
        kind: str,
        op: int | None = None,
        data: Any = None,
        error: BaseException | None = None,
    ) -> None:
        events = self.events
        events.append(Event(len(events), key, kind, op, data, error))

    def wrap(
        self, key: Hashable, op: Callable[Concatenate[R, P], T]
    ) -> Callable[Concatenate[R, P], T]:
        """Log a call of `op` on `key` now; return an op that logs its application.

        Call it in the same expression as `run`/`submit` (no checkpoint in
        between) so the log keeps call order:

        ```python
        await processor.run(key, recorder.wrap(key, deposit), 10)
        ```

        The outcome is not logged this way; [`run`][keybatch.testing.Recorder.run]
        and [`submit`][keybatch.testing.Recorder.submit] log it.
        """
        n = self._ops
        self._ops += 1
        self._log(key, CALL, n, (op, (), {}, "wrap"))
        index = len(self.events) - 1
        return self._applier(key, n, op, index)

    def _applier(
        self, key: Hashable, n: int, op: Callable[..., Any], index: int
    ) -> Callable[..., Any]:
        events = self.events

        def applied(resource: Any, /, *args: Any, **kwargs: Any) -> Any:
            call = events[index]
            if call.data[3] == "wrap" and (args or kwargs):  # args known now
                events[index] = Event(index, key, CALL, n, (op, args, kwargs, "wrap"))
            try:
                value = op(resource, *args, **kwargs)
            except BaseException as exc:
                self._log(key, APPLY, n, None, exc)
                raise
            self._log(key, APPLY, n, value)
            return value

        applied.__name__ = getattr(op, "__name__", "op")
        applied.__qualname__ = getattr(op, "__qualname__", applied.__name__)
        return applied

    def _call(
        self,
        key: Hashable,
        op: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        how: str,
    ) -> tuple[int, Callable[..., Any]]:
        n = self._ops
        self._ops += 1
        self._log(key, CALL, n, (op, args, kwargs, how))
        if _is_async(op):
            return n, op  # let the processor refuse it at the call site
        return n, self._applier(key, n, op, len(self.events) - 1)

    async def run(
        self,
        processor: keybatch.Processor[R],
        key: Hashable,
        op: Callable[Concatenate[R, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run `op` through `processor.run`, logging call, application and outcome.

        Cancellation: as [`keybatch.Processor.run`][keybatch.Processor.run]; the
        cancellation is logged as the outcome and re-raised.
        """
        n, wrapped = self._call(key, op, args, kwargs, "run")
        try:
            value: T = await processor.run(key, wrapped, *args, **kwargs)
        except BaseException as exc:
            self._log(key, OUTCOME, n, None, exc)
            raise
        self._log(key, OUTCOME, n, value)
        return value

    def submit(
        self,
        processor: keybatch.Processor[R],
        key: Hashable,
        op: Callable[Concatenate[R, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> keybatch.Pending[T]:
        """Submit `op` through `processor.submit`, logging call and application.

        The outcome is logged by [`result`][keybatch.testing.Recorder.result] or
        [`collect`][keybatch.testing.Recorder.collect]. An error raised at the
        call (`Overloaded`, `ProcessorStopped`, ...) is logged
        as the outcome and re-raised.
        """
        n, wrapped = self._call(key, op, args, kwargs, "submit")
        try:
            pending = processor.submit(key, wrapped, *args, **kwargs)
        except BaseException as exc:
            self._log(key, OUTCOME, n, None, exc)
            raise
        self._unobserved[n] = pending
        return pending

    async def result(self, pending: keybatch.Pending[T]) -> T:
        """`await pending.result()` for a `submit`-ted operation, logging it.

        Cancellation: nothing is logged; the operation stays queued (as
        [`keybatch.Pending.result`][keybatch.Pending.result]).
        """
        for n, p in self._unobserved.items():  # noqa: B007
            if p is pending:
                break
        else:
            return await pending.result()
        key = self._key_of(n)
        try:
            value = await pending.result()
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise
            del self._unobserved[n]
            self._log(key, OUTCOME, n, None, exc)
            raise
        del self._unobserved[n]
        self._log(key, OUTCOME, n, value)
        return value

    async def collect(self) -> None:
        """Log the outcome of every submitted operation that is done and not logged yet.

        Call it after the processor stopped, before
        [`check`][keybatch.testing.Recorder.check] with `complete=True`.

        Cancellation: stops collecting; what was logged stays.
        """
        await anyio.lowlevel.checkpoint()
        for pending in list(self._unobserved.values()):
            if pending.done():
                try:
                    await self.result(pending)
                except BaseException as exc:
                    if isinstance(exc, anyio.get_cancelled_exc_class()):
                        raise

    def _key_of(self, n: int) -> Hashable:
        for event in self.events:
            if event.op == n and event.kind == CALL:
                return event.key
        raise LookupError(n)  # pragma: no cover

    def wrap_load(
        self, load: Callable[[Hashable], Awaitable[R]]
    ) -> Callable[[Hashable], Awaitable[R]]:
        """Return a load function that logs `load`'s start, result or failure."""

        async def recorded_load(key: Hashable) -> R:
            self._log(key, LOAD)
            try:
                resource = await load(key)
            except BaseException as exc:
                self._log(key, LOAD_FAILED, error=exc)
                raise
            self._log(key, LOADED, data=copy.deepcopy(resource))
            return resource

        return recorded_load

    def wrap_save(
        self, save: Callable[[Hashable, R], Awaitable[object]]
    ) -> Callable[[Hashable, R], Awaitable[None]]:
        """Return a save function that logs `save`'s start (with a copy) and end."""

        async def recorded_save(key: Hashable, resource: R) -> None:
            self._log(key, SAVE, data=copy.deepcopy(resource))
            try:
                await save(key, resource)
            except BaseException as exc:
                self._log(key, SAVE_FAILED, error=exc)
                raise
            self._log(key, SAVED)

        return recorded_save

    @asynccontextmanager
    async def exclusive(
        self,
        processor: keybatch.Processor[Any],
        *keys: Hashable,
        wait: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109 - Processor.exclusive's
    ) -> AsyncIterator[None]:
        """`processor.exclusive(*keys, ...)`, logging the section.

        Logs the call (`section`, one event per key, numbered in the same
        sequence as operations, so the checker knows what was called before
        and after it), its outcome (entered, or the exception, such as
        `KeyBusy`), `held` per key once the block is entered and `released`
        per key once it exited.

        Cancellation: as [`keybatch.Processor.exclusive`][keybatch.Processor.exclusive];
        a cancelled wait is logged as the section's outcome.
        """
        n = self._ops
        self._ops += 1
        distinct = list(dict.fromkeys(keys))
        for key in distinct:
            self._log(key, SECTION, n, (keys, wait, timeout))
        first = distinct[0] if distinct else None
        entered = False
        try:
            async with processor.exclusive(*keys, wait=wait, timeout=timeout):
                entered = True
                self._log(first, OUTCOME, n, None)
                for key in distinct:
                    self._log(key, HELD, n)
                yield
        except BaseException as exc:
            if not entered:
                self._log(first, OUTCOME, n, None, exc)
            raise
        finally:
            if entered:
                for key in distinct:
                    self._log(key, RELEASED, n)

    def watch(self, store: MemoryStore[Any]) -> None:
        """Log every write of `store` (a [`MemoryStore`][keybatch.testing.MemoryStore]).

        A save whose write landed logs `write`, and another writer's write
        ([`MemoryStore.write`][keybatch.testing.MemoryStore.write], an
        `external=` fault) logs `external`, each with a copy of the resource.
        The checker then knows what the store holds: a save that failed after
        its write landed counts, and so do other writers' changes (a batch
        refused with `Conflict` and replayed must apply its operations on top
        of them, once).
        """

        def observe(key: Hashable, resource: Any, external: bool) -> None:
            self._log(key, EXTERNAL if external else WRITE, data=resource)

        store._observers.append(observe)

    def pending_unobserved(self) -> int:
        """Return how many submitted operations have no logged outcome."""
        return len(self._unobserved)

    def check(
        self, saved: Mapping[Hashable, Any] | None = None, *, complete: bool = False
    ) -> None:
        """Verify the log; raise `HistoryViolation` listing what is wrong.

        See [`check_history`][keybatch.testing.check_history] and
        [`HistoryViolation`][keybatch.testing.HistoryViolation]. With
        `complete=True` (the processor has stopped and
        [`collect`][keybatch.testing.Recorder.collect] ran), every submitted
        operation must be done.
        """
        problems = _check(self.events, saved, complete)
        if complete:
            for n, pending in self._unobserved.items():
                if not pending.done():
                    problems.append(f"op {n}: submitted, never finished (lost)")
        if problems:
            raise HistoryViolation(problems)


def recorder() -> Recorder:
    """Create an empty [`Recorder`][keybatch.testing.Recorder].

    Example:
        ```python
        rec = keybatch.testing.recorder()
        store = keybatch.testing.memory_store(lambda key: [])
        async with keybatch.open_processor(
            load=rec.wrap_load(store.load), save=rec.wrap_save(store.save)
        ) as processor:
            await rec.run(processor, "k", list.append, 1)
        rec.check(store.data, complete=True)
        ```
    """
    rec: Recorder = Recorder._create()
    return rec


def _is_async(op: object) -> bool:
    if inspect.iscoroutinefunction(op) or inspect.isasyncgenfunction(op):
        return True
    return callable(op) and inspect.iscoroutinefunction(type(op).__call__)
