"""open_processor() and Processor: options, routing, run/submit, stop."""

from __future__ import annotations

import asyncio
import math
import os
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, final, overload

import anyio
from trio import Event as _TrioEvent

from ._batch import OPEN, Group, KeyState
from ._errors import Overloaded, ProcessorStopped
from ._pending import QUEUED, VALUE, Pending
from ._records import BatchReport, ProcessorStatistics
from ._routing import _route
from ._util import (
    ASYNC_FLAGS,
    AsyncioEvent,
    NoPublicConstructor,
    Room,
    backend_primitives,
    foreign_loop_error,
    is_async_callable,
)
from ._worker import Worker

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["Processor", "open_processor"]

R = TypeVar("R")
T = TypeVar("T")
P = ParamSpec("P")

# Slots are built without calling Pending's constructor: the hot path.
_new_slot = object.__new__
# asyncio.current_task is written in Python before 3.12; its table is not.
_current_task: Callable[[Any], Any] = getattr(asyncio.tasks, "_current_tasks", {}).get
if sys.version_info >= (3, 12) or not isinstance(
    getattr(asyncio.tasks, "_current_tasks", None), dict
):  # pragma: no cover
    _current_task = asyncio.current_task
_get_running_loop = asyncio._get_running_loop
_get_ident = threading.get_ident
_CancelledError = asyncio.CancelledError


@final
class Processor(Generic[R], metaclass=NoPublicConstructor):
    """Batches operations per key; built by :func:`open_processor`.

    ``R`` is the type of the resource that ``load`` returns and operations receive.
    """

    __slots__ = (
        "_load",
        "_save",
        "_min_duration",
        "_max_duration",
        "_max_ops",
        "_max_pending",
        "_on_batch",
        "_router",
        "_nworkers",
        "_workers",
        "_stopping",
        "_all_stopped",
        "_running_workers",
        "_new_event",
        "_clock",
        "_aborting",
        "_cancelled",
        "_thread",
        "_cancel_scope",
        "_room",
        "_pending",
        "_keys",
        "_active",
        "_done",
        "_batches",
        "_load_failures",
        "_save_failures",
        "_op_failures",
        "_withdrawn",
    )

    def __init__(
        self,
        load: Callable[[Any], Awaitable[Any]] | None,
        save: Callable[[Any, Any], Awaitable[object]] | None,
        min_duration: float,
        max_duration: float | None,
        workers: int,
        router: Callable[[Any, int], int] | None,
        max_ops: int | None,
        max_pending: int | None,
        on_batch: Callable[[BatchReport], object] | None,
    ) -> None:
        self._load = load
        self._save = save
        self._min_duration = min_duration
        self._max_duration = max_duration
        self._max_ops = max_ops
        self._max_pending = max_pending
        self._on_batch = on_batch
        self._router = router
        self._nworkers = workers
        self._workers = [Worker(self, i) for i in range(workers)]
        self._stopping = False
        self._aborting = False
        self._all_stopped: Any = None
        self._running_workers = 0
        self._new_event, self._clock, self._cancel_scope = backend_primitives()
        self._cancelled = anyio.get_cancelled_exc_class()
        self._thread = threading.get_ident()
        self._room = Room()
        self._pending = 0
        self._keys = 0
        self._active = 0
        self._done = 0
        self._batches = 0
        self._load_failures = 0
        self._save_failures = 0
        self._op_failures = 0
        self._withdrawn = 0

    def __repr__(self) -> str:
        state = "stopping" if self._stopping else "running"
        return (
            f"<keybatch.Processor {state} workers={self._nworkers}"
            f" pending={self._pending}>"
        )

    async def run(
        self,
        key: Hashable,
        op: Callable[Concatenate[R, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Apply ``op(resource, *args, **kwargs)`` in the key's next batch.

        The operation runs in the worker that owns ``key``, after the operations on
        ``key`` that were run or submitted before it, on the resource the batch
        loaded; ``run`` returns once that batch was saved.

        Args:
            key: Selects the resource and the worker. str or bytes with the
                default router.
            op: A plain (non-async) callable; gets the resource, then ``args``
                and ``kwargs``.

        Returns:
            What ``op`` returned.

        Raises:
            Exception: What ``op`` raised (only this caller gets it; the batch
                goes on and saves the other operations' effects).
            LoadError: The batch's load failed; ``op`` was not applied.
            SaveError: The batch's save failed; ``op``'s effect was not saved.
            ProcessorStopped: The processor is stopping, or was torn down
                before ``op`` was applied.
            TypeError: ``op`` is an async function, or ``key`` has a type the
                router refuses.
            ValueError: ``key`` is a str that is not UTF-8 encodable.

        Cancellation: if ``op`` was not applied yet, it is withdrawn and will
        never be applied. If it was applied already (its batch closed and is
        saving), the cancellation is raised here but the effect stays and is
        saved with its batch; only the result is lost. With ``max_pending``,
        cancelling a wait for room enqueues nothing. This is always a checkpoint.
        """
        if self._max_pending is not None and self._pending >= self._max_pending:
            await self._wait_for_room()
        slot: Pending[T] = self._enqueue(key, op, args, kwargs)
        event = slot._group.event
        if type(event) is AsyncioEvent:
            # asyncio's fast path: AsyncioEvent.wait inlined (see its docstring).
            task: Any = _current_task(event._loop)
            if task is not None and not task.cancelling():
                while not event._flag:
                    future = event._future
                    if future is None or future.done():
                        future = event.shared_future()
                    try:
                        await future
                    except _CancelledError:
                        if task.cancelling() or not future.cancelled():
                            if slot._state == QUEUED:  # never applied
                                slot._withdraw()
                            raise
                        # else another waiter's cancellation: wait again
                    except BaseException as exc:
                        if slot._state == QUEUED:
                            slot._withdraw()
                        if not future.done() and future._asyncio_future_blocking:
                            # Awaited by another event loop (trio.run() inside an
                            # asyncio task): unblock the shared future, or every
                            # other caller of the batch fails on it.
                            future._asyncio_future_blocking = False
                            raise foreign_loop_error() from exc
                        raise
                if slot._state == VALUE:  # the common case, without a call
                    return slot._outcome  # type: ignore[no-any-return]
                return slot._unwrap()
        elif type(event) is _TrioEvent and _get_running_loop() is not None:
            # asyncio.run() inside a trio task: trio would park the wrong task.
            slot._withdraw()
            raise foreign_loop_error()
        try:
            await event.wait()
        except BaseException:
            if slot._state == QUEUED:  # never applied
                slot._withdraw()
            raise
        if slot._state == VALUE:  # the common case, without a call
            return slot._outcome  # type: ignore[no-any-return]
        return slot._unwrap()

    def submit(
        self,
        key: Hashable,
        op: Callable[Concatenate[R, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Pending[T]:
        """Enqueue ``op`` like :meth:`run` without waiting; return its :class:`Pending`.

        The operation is applied and saved whether or not anyone awaits
        ``Pending.result()``.

        Raises:
            Overloaded: ``max_pending`` accepted operations are unfinished.
            ProcessorStopped: The processor is stopping.
            TypeError, ValueError: As for :meth:`run`.
        """
        if self._max_pending is not None and self._pending >= self._max_pending:
            if self._stopping:
                raise ProcessorStopped("the processor is stopping")
            raise Overloaded(
                f"max_pending={self._max_pending} operations are unfinished"
            )
        return self._enqueue(key, op, args, kwargs)

    def _enqueue(
        self,
        key: Hashable,
        op: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Pending[Any]:
        if self._stopping:
            raise ProcessorStopped("the processor is stopping")
        if _get_ident() != self._thread:
            raise RuntimeError(
                "keybatch: a Processor must be used from the thread of the event"
                " loop that opened it; from another thread, use"
                " trio.from_thread.run / anyio.from_thread.run"
            )
        try:
            is_async = op.__code__.co_flags & ASYNC_FLAGS
        except AttributeError:  # not a plain function: a partial, a callable object
            is_async = not callable(op) or is_async_callable(op)
        if is_async:
            if not callable(op):
                raise TypeError(f"op must be callable, got {type(op).__name__}")
            raise TypeError(
                f"op must be a plain function, got async {op!r}; do the I/O in"
                " load/save and keep operations synchronous"
            )
        router = self._router
        if router is None:
            index = _route(key, self._nworkers)
        else:
            index = router(key, self._nworkers)
            if type(index) is not int or not 0 <= index < self._nworkers:
                raise ValueError(
                    f"worker_for_key returned {index!r} for key {key!r};"
                    f" expected an int in range({self._nworkers})"
                )
        worker = self._workers[index]
        st = worker.keys.get(key)
        if st is None:
            st = KeyState(key, worker, self._clock())
            worker.keys[key] = st
            self._keys += 1
            group = Group(st, self._new_event())
            st.groups.append(group)
            worker.schedule(st)
        else:
            groups = st.groups
            max_ops = self._max_ops
            if not groups or (max_ops is not None and len(groups[-1].slots) >= max_ops):
                group = Group(st, self._new_event())
                groups.append(group)
            else:
                group = groups[-1]
        slot: Pending[Any] = _new_slot(Pending)
        slot._op = op
        slot._args = args
        slot._kwargs = kwargs
        slot._state = QUEUED
        slot._outcome = None
        slot._group = group
        slots = group.slots
        slots.append(slot)
        group.live += 1
        self._pending += 1
        max_ops = self._max_ops
        if (
            max_ops is not None
            and len(slots) == max_ops
            and st.phase == OPEN
            and group is st.groups[0]
        ):
            worker.schedule(st)  # the open batch is full: close it now
        return slot

    async def _wait_for_room(self) -> None:
        max_pending = self._max_pending
        assert max_pending is not None
        while self._pending >= max_pending:
            if self._stopping:
                raise ProcessorStopped("the processor is stopping")
            await self._room.wait(self._new_event())

    async def flush(self) -> None:
        """Close every batch now and wait for the operations accepted so far.

        Batches whose window is open close at once; operations queued for a key
        whose batch is saving, or not loaded yet, get a batch that closes as
        soon as it is loaded. Returns once every operation accepted before the
        call has its outcome (saved, or failed: ``flush`` itself raises nothing
        about them). Operations accepted during the flush keep normal windows.

        Cancellation: stops the wait; the batches closed early stay closed.
        This is always a checkpoint.
        """
        if threading.get_ident() != self._thread:
            raise RuntimeError("keybatch: flush() called from a foreign thread")
        events = []
        for worker in self._workers:
            for st in worker.keys.values():
                if st.closing is not None:
                    events.append(st.closing.event)
                for group in st.groups:
                    group.urgent = True
                    events.append(group.event)
                if st.phase == OPEN:
                    worker.schedule(st)
        await anyio.lowlevel.checkpoint()
        for event in events:
            if not event.is_set():
                await event.wait()

    def statistics(self) -> ProcessorStatistics:
        """Return a snapshot of the processor's counters."""
        return ProcessorStatistics(
            workers=self._nworkers,
            keys=self._keys,
            active_batches=self._active,
            pending_operations=self._pending,
            operations_done=self._done,
            batches_done=self._batches,
            load_failures=self._load_failures,
            save_failures=self._save_failures,
            operation_failures=self._op_failures,
            operations_withdrawn=self._withdrawn,
            stopping=self._stopping,
        )

    def _begin_stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        for worker in self._workers:
            worker.begin_stop()
        self._room.wake_all()

    async def aclose(self) -> None:
        """Stop gracefully; the same as leaving the ``async with`` block.

        New calls raise :class:`ProcessorStopped` at once. Open batches close
        now; every operation accepted before the stop is applied and saved (or
        its caller gets the error), including the ones queued behind a batch
        that is saving. Returns once every worker task has exited and no key
        state is left. Calling it again, or after the block, returns at once.

        Cancellation: cancelling ``aclose`` stops the wait, not the stop: the
        workers go on draining inside the processor's task group.
        """
        self._begin_stop()
        done = self._all_stopped
        if done is None or done.is_set():
            await anyio.lowlevel.checkpoint()
        else:
            await done.wait()

    async def _work(self, worker: Worker) -> None:
        try:
            await worker.run()
        finally:
            self._running_workers -= 1
            if self._running_workers == 0:
                self._all_stopped.set()


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
) -> AbstractAsyncContextManager[Processor[Any]]:
    """Open a batch processor: an async context manager yielding a :class:`Processor`.

    ``async with open_processor(...) as processor:`` starts ``workers`` worker
    tasks; leaving the block stops gracefully (see :meth:`Processor.aclose`). If
    the block raises or is cancelled, the workers are cancelled instead: saves in
    progress still finish (shielded, bounded by ``max_duration``), and operations
    not applied yet fail with :class:`ProcessorStopped`.

    Args:
        load: ``async load(key) -> resource``; called once per batch. Default:
            the resource is None.
        save: ``async save(key, resource)``; called once per batch in which an
            operation was applied. Default: nothing is saved.
        min_duration: Seconds a batch stays open, counted from its start. 0
            closes it as soon as the operations queued so far are applied.
        max_duration: Deadline of load plus save, counted from the batch start.
            Default ``2 * min_duration``; None with ``min_duration=0`` means no
            deadline. Enforced by cancellation: a load or save that reaches no
            cancellable await after the deadline (a running thread that is not
            abandoned, say) and then returns normally counts as on time.
        workers: Number of worker tasks, which bounds the loads and saves in
            flight. Default 16 x CPU count.
        worker_for_key: ``(key, workers) -> index`` router. Default
            :func:`keybatch.worker_for_key` (str or bytes keys).
        max_ops: Close a batch early once it holds this many operations.
        max_pending: Bound on accepted, unfinished operations: ``run`` waits
            for room, ``submit`` raises :class:`Overloaded`.
        on_batch: Plain callable given a :class:`BatchReport` after each batch.
            Exceptions it raises are logged and ignored.

    Raises:
        ValueError: A negative duration, ``max_duration < min_duration``, or a
            count below 1.
        TypeError: ``load``/``save`` is not an async callable, or a hook or
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
    )
    if max_duration is None and min_duration > 0:
        max_duration = 2 * min_duration
    return _open(
        partial(
            Processor._create,
            load,
            save,
            float(min_duration),
            None if max_duration is None else float(max_duration),
            nworkers,
            worker_for_key,
            max_ops,
            max_pending,
            on_batch,
        )
    )


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
    for name, value in (
        ("workers", workers),
        ("max_ops", max_ops),
        ("max_pending", max_pending),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value!r}")
    return workers  # type: ignore[return-value]


@asynccontextmanager
async def _open(create: Callable[[], Processor[Any]]) -> AsyncIterator[Processor[Any]]:
    proc = create()  # in the event loop: it picks the backend's primitives
    proc._all_stopped = proc._new_event()
    body_error: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            proc._running_workers = proc._nworkers
            for worker in proc._workers:
                tg.start_soon(
                    proc._work, worker, name=f"keybatch worker {worker.index}"
                )
            try:
                yield proc
            except BaseException as exc:
                # Tear down: the task group cancels the workers; they fail what
                # was not applied and keep shielded saves going.
                body_error = exc
                proc._aborting = True
                proc._begin_stop()
                raise
            await proc.aclose()
    except BaseExceptionGroup as group:
        # The user's own exception (or cancellation) comes out as it went in,
        # not wrapped in a group by our internal task group.
        if body_error is None or list(group.exceptions) != [body_error]:
            raise
        context, suppress = body_error.__context__, body_error.__suppress_context__
        try:
            raise body_error
        finally:
            body_error.__context__ = context
            body_error.__suppress_context__ = suppress
            del body_error, group
