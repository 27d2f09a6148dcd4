"""The facade: open_processor() and Processor.

A call is validated, routed to its worker, accepted by the engine (or queued for
room under `max_pending`), and then its caller parks in the backend:
`return await backend.park(slot)`, where the worker hands it its own outcome.
Every state change happens in the engine.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import copy_context
from typing import (
    Any,
    Concatenate,
    Generic,
    NoReturn,
    ParamSpec,
    TypeVar,
    final,
    overload,
)

import anyio

from ._admission import Waiter
from ._backends import current_backend
from ._engine import Engine, EngineState, Worker
from ._errors import KeyBusy, Overloaded, ProcessorStopped
from ._model import KeyPhase, Options, Section, SlotState
from ._pending import Pending, deliver
from ._records import BatchReport, ProcessorStatistics
from ._routing import _route
from ._util import ASYNC_FLAGS, NoPublicConstructor, is_async_callable, reraise

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["Processor", "open_processor"]

R = TypeVar("R")
T = TypeVar("T")
P = ParamSpec("P")

RUNNING = EngineState.RUNNING
_get_ident = threading.get_ident


@final
class Processor(Generic[R], metaclass=NoPublicConstructor):
    """Batches operations per key; built by [`open_processor`][keybatch.open_processor].

    `R` is the type of the resource that `load` returns and operations receive.
    """

    __slots__ = (
        "_engine",
        "_thread",
        "_max_pending",
        "_router",
        "_workers",
        "_nworkers",
        "_waiter",
        "_park",
        "_unpark",
    )

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._thread = _get_ident()
        self._max_pending = engine.options.max_pending
        self._router = engine.options.router
        self._workers = engine.workers
        self._nworkers = len(engine.workers)
        backend = engine.backend
        self._waiter = backend.waiter
        self._park = backend.park
        self._unpark = backend.unpark

    def __repr__(self) -> str:
        engine = self._engine
        return (
            f"<keybatch.Processor {engine.state.value} workers={len(self._workers)}"
            f" pending={engine.counters.pending}>"
        )

    def _prepare(self, key: Hashable, op: Callable[..., Any]) -> Worker:
        """Refuse a call that cannot be accepted; return the key's worker.
        (`run` does the same inline: it is the hot path.)"""
        if self._engine.state is not RUNNING or _get_ident() != self._thread:
            self._refuse()
        try:
            if op.__code__.co_flags & ASYNC_FLAGS:
                _refuse_op(op)
        except AttributeError:  # not a plain function: a partial, a callable object
            _check_odd_op(op)
        if self._router is None:
            return self._workers[_route(key, self._nworkers)]
        return self._routed(key)

    def _refuse(self) -> NoReturn:
        if self._engine.state is not RUNNING:
            raise ProcessorStopped("the processor is stopping")
        raise RuntimeError(
            "keybatch: a Processor must be used from the thread of the event"
            " loop that opened it; from another thread, use"
            " trio.from_thread.run / anyio.from_thread.run"
        )

    def _routed(self, key: Hashable) -> Worker:
        """The worker that `worker_for_key` picks, checked."""
        workers = self._workers
        index = self._router(key, len(workers))  # type: ignore[misc]
        if type(index) is not int or not 0 <= index < len(workers):
            raise ValueError(
                f"worker_for_key returned {index!r} for key {key!r};"
                f" expected an int in range({len(workers)})"
            )
        return workers[index]

    async def run(
        self,
        key: Hashable,
        op: Callable[Concatenate[R, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Apply `op(resource, *args, **kwargs)` in the key's next batch.

        The operation runs in the worker that owns `key`, after the operations on
        `key` that were run or submitted before it, on the resource the batch
        loaded, in a copy of the caller's `contextvars` context (what it sets
        stays in the copy); `run` returns once that batch was saved.

        Args:
            key: Selects the resource and the worker. str or bytes with the
                default router.
            op: A plain (non-async) callable; gets the resource, then `args`
                and `kwargs`.

        Returns:
            What `op` returned.

        Raises:
            Exception: What `op` raised (only this caller gets it; the batch
                goes on and saves the other operations' effects).
            LoadError: The batch's load failed; `op` was not applied.
            SaveError: The batch's save did not complete. `may_have_landed`
                says whether the write may have reached the store anyway.
            ProcessorStopped: The processor is stopping, or was torn down
                before `op` was applied.
            TypeError: `op` is an async function, or `key` has a type the
                router refuses.
            ValueError: `key` is a str that is not UTF-8 encodable.

        Cancellation: if `op` was not applied yet, it is withdrawn and will
        never be applied. If it was applied already (its batch closed and is
        saving), the cancellation is raised here but the effect stays and is
        saved with its batch; only the result is lost. With `max_pending`,
        cancelling a wait for room enqueues nothing. This is always a checkpoint.
        """
        # _prepare, inline
        engine = self._engine
        if engine.state is not RUNNING or _get_ident() != self._thread:
            self._refuse()
        try:
            if op.__code__.co_flags & ASYNC_FLAGS:
                _refuse_op(op)
        except AttributeError:
            _check_odd_op(op)
        if self._router is None:
            worker = self._workers[_route(key, self._nworkers)]
        else:
            worker = self._routed(key)
        limit = self._max_pending
        if limit is not None and (
            engine.counters.pending >= limit or engine.admission.waiting
        ):
            return await self._run_after_wait(worker, key, op, args, kwargs)  # type: ignore[no-any-return]
        waiter = self._waiter()
        if waiter is None:  # cancelled already: accept nothing
            await engine.backend.checkpoint()  # raises, unless it was swallowed
            waiter = self._waiter(False)
        slot = engine.accept(worker, key, op, args, kwargs, copy_context(), waiter)
        del waiter  # an error it will carry would reach this frame: no cycle
        try:
            return await self._park(slot)  # type: ignore[no-any-return]
        except BaseException as exc:
            self._unpark(slot, exc)  # withdraws it if it was not applied
            raise

    async def _run_after_wait(
        self,
        worker: Worker,
        key: Hashable,
        op: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """`run` under `max_pending` with no room: wait in line, then park."""
        engine = self._engine
        waiter = Waiter(
            worker, key, op, args, kwargs, copy_context(), engine.new_event()
        )
        slot: Pending[Any] = await self._wait_in_line(waiter, self._take_back)
        try:
            parked = self._waiter()
            if parked is None:  # cancelled since it was admitted
                await engine.backend.checkpoint()  # raises, unless swallowed
                parked = self._waiter(False)
            if slot._batch.finished:  # it ran before this task did
                return deliver(slot)
            slot._waiter = parked
            del parked  # see run: no cycle through an error it will carry
            return await self._park(slot)
        except BaseException as exc:
            self._unpark(slot, exc)  # withdraws it if it was not applied
            raise

    def _take_back(self, slot: Pending[Any]) -> None:
        if slot._state is SlotState.QUEUED:
            self._engine.withdraw(slot)  # admitted, not applied: take it back

    async def _wait_in_line(self, waiter: Waiter, undo: Callable[[Any], None]) -> Any:
        """Wait in the admission queue until the engine admits `waiter`; return
        what it admitted. Cancelled before that, it leaves the queue; after
        that, `undo` takes back what was admitted."""
        engine = self._engine
        engine.admission.push(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.slot is not None:
                undo(waiter.slot)
            elif not waiter.refused:
                engine.admission.cancel(waiter)
            raise
        if waiter.refused:
            raise ProcessorStopped("the processor is stopping")
        return waiter.slot

    def submit(
        self,
        key: Hashable,
        op: Callable[Concatenate[R, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Pending[T]:
        """Enqueue `op` like [`run`][keybatch.Processor.run] without waiting.

        The operation is applied and saved whether or not anyone awaits
        [`Pending.result()`][keybatch.Pending.result].

        Raises:
            Overloaded: `max_pending` accepted operations are unfinished, or
                callers are waiting for room (the room freed next is theirs).
            ProcessorStopped: The processor is stopping.
            TypeError, ValueError: As for [`run`][keybatch.Processor.run].
        """
        worker = self._prepare(key, op)
        engine = self._engine
        limit = self._max_pending
        if limit is not None and (
            engine.counters.pending >= limit or engine.admission.waiting
        ):
            raise Overloaded(
                f"max_pending={limit} operations are unfinished"
                + (
                    f" and {engine.admission.waiting} callers wait for room"
                    if engine.admission.waiting
                    else ""
                )
            )
        return engine.accept(worker, key, op, args, kwargs, copy_context(), None)

    async def flush(self) -> None:
        """Close every batch now and wait for the operations accepted so far.

        Batches whose window is open close at once; operations queued for a key
        whose batch is saving, or not loaded yet, get a batch that closes as
        soon as it is loaded. Returns once every operation accepted before the
        call has its outcome (saved, or failed: `flush` itself raises nothing
        about them). Operations accepted during the flush keep normal windows.
        Operations queued behind an [`exclusive`][keybatch.Processor.exclusive]
        section wait for it.

        Cancellation: stops the wait; the batches closed early stay closed.
        This is always a checkpoint.
        """
        self._check_thread("flush")
        events = self._engine.flush_events()
        await self._engine.backend.checkpoint()
        for event in events:
            if not event.is_set():
                await event.wait()

    @asynccontextmanager
    async def exclusive(
        self,
        *keys: Hashable,
        wait: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109 - the documented API
    ) -> AsyncIterator[None]:
        """Hold `keys` for the block: no batch of them runs until it exits.

        On entry, every operation on those keys called before it finishes first
        (applied and saved, or failed); then the keys are held. Operations
        called while the section waits or holds are queued in call order and
        run after it: nothing is lost. Several keys are taken together, without
        deadlock (every section queues on all its keys at once, so sections
        meet every key in the same order).

        Args:
            keys: The keys to hold (routed like [`run`][keybatch.Processor.run]).
            wait: False raises [`KeyBusy`][keybatch.KeyBusy] at once if a key is
                busy: it has queued operations, a batch in flight, or another
                section.
            timeout: Seconds to wait for the keys; then
                [`KeyBusy`][keybatch.KeyBusy] names the keys not yet reached.

        Raises:
            KeyBusy: As above; nothing is held. A call waiting for room under
                `max_pending` makes its key busy, and the section queues behind
                it (`timeout` counts that wait too).
            ProcessorStopped: The processor is stopping, or was torn down while
                the section waited.
            TypeError, ValueError: No key, or a key the router refuses (as for
                [`run`][keybatch.Processor.run]).

        Cancellation: cancelling the wait, or the block, releases the keys.
        A graceful stop waits for held sections to end. Entering is always a
        checkpoint.
        """
        engine = self._engine
        if not keys:
            raise TypeError("exclusive() needs at least one key")
        routed: list[tuple[Worker, Hashable]] = []
        seen = set()
        for key in keys:
            worker = self._prepare(key, _noop)
            if key not in seen:
                seen.add(key)
                routed.append((worker, key))
        # Callers waiting for room on these keys were called first: a section
        # on their keys queues behind them (in the admission queue).
        waiting = engine.admission.keys() if engine.admission.waiting else set()
        behind = [key for _, key in routed if key in waiting]
        if not wait:
            busy = [
                key
                for worker, key in routed
                if key in waiting or engine.busy(worker, key)
            ]
            if busy:
                raise KeyBusy(busy)
        deadline = math.inf if timeout is None else engine.clock() + timeout
        section: Section | None = None
        try:
            with engine.backend.cancel_scope(deadline=deadline):
                if behind:
                    section = await self._queue_section(routed)
                else:
                    section = engine.open_section(routed)
                if section.held:
                    await engine.backend.checkpoint()
                else:
                    await section.event.wait()
            if section is None:
                raise KeyBusy(behind)  # timed out behind callers waiting for room
            if section.failed:
                raise ProcessorStopped("the processor is stopping")
            if not section.held:  # timed out
                raise KeyBusy(
                    [
                        st.key
                        for st in section.states
                        if not (st.queue and st.queue[0] is section)
                        or st.phase is not KeyPhase.HELD
                    ]
                )
            yield
        finally:
            if section is not None:
                engine.release_section(section)

    async def _queue_section(self, routed: list[tuple[Worker, Hashable]]) -> Section:
        """Wait in the admission queue for the callers ahead; then open it."""
        engine = self._engine
        waiter = Waiter(None, None, _noop, (), {}, copy_context(), engine.new_event())
        waiter.section = routed
        return await self._wait_in_line(waiter, engine.release_section)  # type: ignore[no-any-return]

    def statistics(self) -> ProcessorStatistics:
        """Return a snapshot of the processor's counters (a frozen record)."""
        engine = self._engine
        workers = self._workers
        return engine.counters.statistics(
            workers=len(workers),
            keys=sum(len(w.keys) for w in workers),
            stopping=engine.state is not RUNNING,
            max_worker_queue=max(w.queued for w in workers),
        )

    def _check_thread(self, what: str) -> None:
        if _get_ident() != self._thread:
            raise RuntimeError(f"keybatch: {what}() called from a foreign thread")

    async def aclose(self) -> None:
        """Stop gracefully; the same as leaving the `async with` block.

        New calls raise [`ProcessorStopped`][keybatch.ProcessorStopped] at
        once, and so do callers waiting for room. Open batches close now; every
        operation accepted before the stop is applied and saved (or its caller
        gets the error), including the ones queued behind a batch that is
        saving or behind an exclusive section (which the stop waits for).
        Returns once every worker task has exited and no key state is left.
        Calling it again, or after the block, returns at once. Called from
        another thread it raises `RuntimeError` and changes nothing.

        Cancellation: cancelling `aclose` stops the wait, not the stop: the
        workers go on draining inside the processor's task group.
        """
        self._check_thread("aclose")
        engine = self._engine
        engine.begin_stop(abort=False)
        done = engine.all_stopped
        if done.is_set():
            await engine.backend.checkpoint()
        else:
            await done.wait()


def _noop(resource: object) -> None:
    return None


def _refuse_op(op: Callable[..., Any]) -> NoReturn:
    raise TypeError(
        f"op must be a plain function, got async {op!r}; do the I/O in"
        " load/save and keep operations synchronous"
    )


def _check_odd_op(op: object) -> None:
    """An op that is not a plain function: a partial, a callable object."""
    if not callable(op):
        raise TypeError(f"op must be callable, got {type(op).__name__}")
    if is_async_callable(op):
        _refuse_op(op)


@overload
def open_processor(
    *,
    load: Callable[[Any], Awaitable[R]],
    save: Callable[[Any, R], Awaitable[object]] | None = None,
    min_duration: float = 0.1,
    max_duration: float | None = None,
    workers: int | None = None,
    worker_for_key: Callable[[Any, int], int] | None = None,
    max_ops: int | None = None,
    max_pending: int | None = None,
    on_batch: Callable[[BatchReport], object] | None = None,
    max_replays: int = 3,
) -> AbstractAsyncContextManager[Processor[R]]: ...


@overload
def open_processor(
    *,
    load: None = None,
    save: Callable[[Any, None], Awaitable[object]] | None = None,
    min_duration: float = 0.1,
    max_duration: float | None = None,
    workers: int | None = None,
    worker_for_key: Callable[[Any, int], int] | None = None,
    max_ops: int | None = None,
    max_pending: int | None = None,
    on_batch: Callable[[BatchReport], object] | None = None,
    max_replays: int = 3,
) -> AbstractAsyncContextManager[Processor[None]]: ...


def open_processor(
    *,
    load: Callable[[Any], Awaitable[Any]] | None = None,
    save: Callable[[Any, Any], Awaitable[object]] | None = None,
    min_duration: float = 0.1,
    max_duration: float | None = None,
    workers: int | None = None,
    worker_for_key: Callable[[Any, int], int] | None = None,
    max_ops: int | None = None,
    max_pending: int | None = None,
    on_batch: Callable[[BatchReport], object] | None = None,
    max_replays: int = 3,
) -> AbstractAsyncContextManager[Processor[Any]]:
    """Open a batch processor: an async context manager yielding a `Processor`.

    `async with open_processor(...) as processor:` starts `workers` worker
    tasks; leaving the block stops gracefully (see
    [`Processor.aclose`][keybatch.Processor.aclose]). If the block raises or
    is cancelled, the workers are cancelled instead: saves in progress still
    finish (shielded, bounded by `max_duration`), and operations not applied
    yet fail with [`ProcessorStopped`][keybatch.ProcessorStopped]. On asyncio,
    a native `task.cancel()` of a worker task (not through the processor's
    owner) cannot be shielded against: it interrupts a save in progress, whose
    callers get a [`SaveError`][keybatch.SaveError] with `may_have_landed=True`,
    and tears the processor down.

    `load`, `save` and `on_batch` run in the worker tasks, in the contextvars
    context in which `open_processor` was entered; each operation runs in a
    copy of its caller's context.

    Args:
        load: `async load(key) -> resource`; called once per batch (again on a
            replay). Default: the resource is None.
        save: `async save(key, resource)`; called once per batch in which an
            operation was applied. It may raise [`Conflict`][keybatch.Conflict]
            when the stored version moved. Default: nothing is saved.
        min_duration: Seconds a batch stays open, counted from its start. 0
            closes it as soon as the operations queued so far are applied.
        max_duration: Deadline of load plus save, counted from the batch start.
            Default `2 * min_duration`; None with `min_duration=0` means no
            deadline. Enforced by cancellation: a load or save that reaches no
            cancellable await after the deadline (a running thread that is not
            abandoned, say) and then returns normally counts as on time.
        workers: Number of worker tasks, which bounds the loads and saves in
            flight. Default 16 x CPU count.
        worker_for_key: `(key, workers) -> index` router. Default
            [`keybatch.worker_for_key`][keybatch.worker_for_key] (str or bytes keys).
        max_ops: Close a batch early once it holds this many operations.
        max_pending: Bound on accepted, unfinished operations: `run` waits for
            room (first come, first served), `submit` raises
            [`Overloaded`][keybatch.Overloaded].
        on_batch: Plain callable given a [`BatchReport`][keybatch.BatchReport]
            after each batch. An `Exception` it raises is logged (WARNING,
            logger `keybatch`) and ignored; a `BaseException` tears the
            processor down and comes out of the block.
        max_replays: How many times a batch whose save raised
            [`Conflict`][keybatch.Conflict] loads and applies again before its
            callers get a [`SaveError`][keybatch.SaveError]. Operations must
            be pure functions of the resource: a replay calls them again.

    Raises:
        ValueError: A negative duration, `max_duration < min_duration`, or a
            count below its minimum.
        TypeError: `load`/`save` is not an async callable, or a hook or
            router is not a plain callable.
    """
    nworkers = _validate(
        load,
        save,
        min_duration,
        max_duration,
        workers,
        worker_for_key,
        max_ops,
        max_pending,
        on_batch,
        max_replays,
    )
    if max_duration is None and min_duration > 0:
        max_duration = 2 * min_duration
    options = Options(
        load=load,
        save=save,
        min_duration=float(min_duration),
        max_duration=None if max_duration is None else float(max_duration),
        workers=nworkers,
        router=worker_for_key,
        max_ops=max_ops,
        max_pending=max_pending,
        on_batch=on_batch,
        max_replays=max_replays,
    )
    return _open(options)


def _validate(
    load: object,
    save: object,
    min_duration: object,
    max_duration: object,
    workers: object,
    router: object,
    max_ops: object,
    max_pending: object,
    on_batch: object,
    max_replays: object,
) -> int:
    for name, fn in (("load", load), ("save", save)):
        if fn is not None and not (callable(fn) and is_async_callable(fn)):
            raise TypeError(f"{name} must be an async function, got {fn!r}")
    for name, fn in (("worker_for_key", router), ("on_batch", on_batch)):
        if fn is not None and (not callable(fn) or is_async_callable(fn)):
            raise TypeError(f"{name} must be a plain (non-async) callable, got {fn!r}")
    for name, value in (("min_duration", min_duration), ("max_duration", max_duration)):
        if value is None and name == "max_duration":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number of seconds, got {value!r}")
        if math.isnan(value) or value < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    if min_duration == math.inf:
        raise ValueError("min_duration must be finite")
    if max_duration is not None and max_duration < min_duration:  # type: ignore[operator]
        raise ValueError(
            f"max_duration ({max_duration}) must be >= min_duration ({min_duration})"
        )
    if workers is None:
        workers = 16 * (os.cpu_count() or 1)
    for name, value, least in (
        ("workers", workers, 1),
        ("max_ops", max_ops, 1),
        ("max_pending", max_pending, 1),
        ("max_replays", max_replays, 0),
    ):
        if value is None and name != "max_replays" and name != "workers":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value!r}")
    return workers  # type: ignore[return-value]


@asynccontextmanager
async def _open(options: Options) -> AsyncIterator[Processor[Any]]:
    # In the event loop: the backend is picked once, from the running loop.
    engine = Engine(options, current_backend())
    proc: Processor[Any] = Processor._create(engine)
    body_error: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            engine.running = len(engine.workers)
            for worker in engine.workers:
                tg.start_soon(
                    engine.run_worker, worker, name=f"keybatch worker {worker.index}"
                )
            try:
                yield proc
            except BaseException as exc:
                # Teardown: stop admitting first, then cancel the workers (a
                # worker that is saving finishes its save first); they fail
                # what was not applied.
                body_error = exc
                engine.begin_stop(abort=True)
                raise
            try:
                await proc.aclose()
            except BaseException:
                engine.begin_stop(abort=True)  # the graceful stop was cut short
                raise
    except BaseExceptionGroup as group:
        # The user's own exception (or cancellation), or the one exception that
        # killed a worker (a BaseException from load, save or on_batch), comes
        # out as it went in, not wrapped in a group by our internal task group.
        single = _the_one_error(group, body_error, engine.backend.cancelled)
        if single is None:
            raise
        del body_error, group
        reraise(single)


def _the_one_error(
    group: BaseExceptionGroup[BaseException],
    body_error: BaseException | None,
    cancelled: type[BaseException],
) -> BaseException | None:
    leaves: list[BaseException] = []

    def flatten(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                flatten(inner)
        else:
            leaves.append(exc)

    flatten(group)
    if body_error is not None and leaves == [body_error]:
        return body_error
    # A cancellation of the body caused by a dying worker is not news.
    real = [exc for exc in leaves if not isinstance(exc, cancelled)]
    if len(real) == 1 and (body_error is None or isinstance(body_error, cancelled)):
        return real[0]
    return None
