"""The loader: windows of ids, workers that run one batch_load per window."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from contextvars import ContextVar
from typing import Any, Generic, TypeVar, final

import anyio
from anyio.abc import TaskStatus

import keybatch
from keybatch._util import NoPublicConstructor

from ._errors import BatchLoadError, LoadFailed
from ._handle import PendingLoad
from ._records import LoaderStatistics
from ._signal import Signal
from ._window import CLOSED, DONE, LOADING, OPEN, Window

__all__ = ["Loader"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

logger = logging.getLogger("keybatch.loader")

_MISSING: Any = object()

# The loader's life.
RUNNING = 0
CLOSING = 1  # leaving the block: loads made from inside batch_load only
STOPPED = 2


@final
class Loader(Generic[K, V], metaclass=NoPublicConstructor):
    """Batches `load(id)` calls into `batch_load(ids)` calls; built by
    [`open_loader`][keybatch.loader.open_loader].

    `K` is the type of the ids, `V` the type of the values.
    """

    __slots__ = (
        "_batch_load",
        "_max_wait",
        "_max_batch",
        "_cache",
        "_hit_cache",
        "_inflight",
        "_state",
        "_open",
        "_ready",
        "_idle",
        "_unfinished",
        "_all_done",
        "_new_signal",
        "_clock",
        "_chain",
        "_spawn",
        "_abort",
        "_fatal",
        "_loads",
        "_hits",
        "_shared",
        "_batches",
        "_ids_loaded",
        "_failed",
        "_missing",
        "_failed_ids",
        "_in_flight",
    )

    def __init__(
        self,
        batch_load: Callable[[list[K]], Awaitable[Mapping[K, V]]],
        max_wait: float,
        max_batch_size: int | None,
        cache: bool,
        new_signal: Callable[[], Signal],
        spawn: Callable[..., object],
        abort: Callable[[], object],
    ) -> None:
        self._batch_load = batch_load
        self._max_wait = max_wait
        self._max_batch = max_batch_size
        self._cache: dict[K, V] | None = {} if cache else None
        # The cache while the loader runs (None otherwise): load's hit path
        # reads one attribute. Loads answered by it count in _hits only.
        self._hit_cache = self._cache
        # with the cache: id -> the window that will load it or is loading it
        self._inflight: dict[K, Window] = {}
        self._state = RUNNING
        self._open: Window | None = None  # the window taking new ids
        self._ready: deque[Window] = deque()  # closed, waiting for a worker
        self._idle: list[Signal] = []  # parked workers, woken to take a window
        self._unfinished = 0  # windows not DONE
        self._all_done: Signal | None = None  # set when _unfinished drops to 0
        self._new_signal = new_signal
        self._clock = anyio.current_time
        # The windows whose batch_load the current task runs inside (nested loads).
        self._chain: ContextVar[tuple[Window, ...]] = ContextVar(
            "keybatch.loader.chain", default=()
        )
        self._spawn = spawn  # starts a helper task in the loader's task group
        self._abort = abort  # cancels the loader's task group (and the block)
        self._fatal: BaseException | None = None
        self._loads = 0
        self._hits = 0
        self._shared = 0
        self._batches = 0
        self._ids_loaded = 0
        self._failed = 0
        self._missing = 0
        self._failed_ids = 0
        self._in_flight = 0

    def __repr__(self) -> str:
        cache = "on" if self._cache is not None else "off"
        state = ("open", "closing", "closed")[self._state]
        return (
            f"<keybatch.loader.Loader {state} cache={cache}"
            f" in_flight={self._in_flight}>"
        )

    # ------------------------------------------------------------------ loading

    async def load(self, id: K) -> V:
        """Return the value of `id`, loaded with the other ids of its window.

        With the cache on, a cached value is returned at once, and an `id`
        whose `batch_load` call is running already waits for that call.

        Returns:
            What the `batch_load` call's mapping holds for `id`, or the
            cached value.

        Raises:
            TypeError: `id` is None or not hashable (nothing was enqueued).
            KeyError: The mapping had no `id` (only this caller gets it).
            LoadFailed: The mapping gave an exception for `id`; `__cause__` is
                that exception. Only the callers of `id` get it, each its own.
            BatchLoadError: `batch_load` raised (`__cause__`) or returned no
                mapping; every caller of the batch gets its own instance.
            keybatch.ProcessorStopped: The loader is closed or closing, or was
                torn down before `id` was loaded.
            RuntimeError: Called from inside `batch_load` for an id that this
                very call (or one it waits for) is loading: it would wait for
                itself.

        Cancellation: before its window's `batch_load` started, the caller is
        withdrawn (an id nobody else waits for leaves the window). Once the
        call runs, it goes on for the other callers and fills the cache; only
        this caller's value is lost. A load that waits is a checkpoint; a
        cache hit returns at once, without yielding to other tasks and without
        checking for cancellation (like awaiting a finished future).
        """
        cache = self._hit_cache
        if cache is not None:  # the hit path, inlined
            value = cache.get(id, _MISSING)  # TypeError: unhashable
            if value is not _MISSING:
                self._hits += 1
                return value  # type: ignore[no-any-return]
        window = self._enqueue(id)
        if window is None:  # a cache hit (a nested load while closing)
            return self._cache[id]  # type: ignore[index]
        try:
            await window.signal.wait()
        except BaseException:
            if window.state < LOADING:
                self._withdraw(window, id)
            raise
        if window.error is None:
            value = window.values.get(id, _MISSING)
            if value is not _MISSING and not isinstance(value, Exception):
                return value  # type: ignore[no-any-return]
        return self._outcome(window, id)

    def load_nowait(self, id: K) -> PendingLoad[V]:
        """Enqueue a load of `id` now; return a handle to await for its value.

        Unlike [`load`][keybatch.loader.Loader.load], which enqueues when the
        coroutine first runs, the id joins the current window before this
        returns: a resolver that returns the handle (an awaitable) to a GraphQL
        engine still batches with its siblings, whatever order the engine
        awaits them in.

        Returns:
            A [`PendingLoad`][keybatch.loader.PendingLoad]: `await handle` (or
            `await handle.result()`) gives what `load` would.

        Raises:
            TypeError, keybatch.ProcessorStopped, RuntimeError: As for
                [`load`][keybatch.loader.Loader.load], at once.
        """
        window = self._enqueue(id)
        value = self._cache[id] if window is None else None  # type: ignore[index]
        handle: PendingLoad[V] = PendingLoad._create(self._outcome, id, window, value)
        return handle

    async def load_many(self, ids: Iterable[K]) -> list[V]:
        """Return the values of `ids`, in order; they all join the same window.

        Raises:
            TypeError: An id is None or not hashable (nothing was enqueued).
            KeyError, LoadFailed, BatchLoadError: For the first id (in order)
                that failed, as [`load`][keybatch.loader.Loader.load] would;
                the other ids are still loaded.
            keybatch.ProcessorStopped: The loader is closed or closing, or was
                torn down before the ids were loaded.

        Cancellation: the ids whose window's `batch_load` has not started are
        withdrawn, as for `load`; the others are still loaded (and cached).
        As for `load`, it is a checkpoint unless every id was cached.
        """
        ids = list(ids)
        for id in ids:
            self._check_id(id)
        windows: list[Window | None] = []
        try:
            for id in ids:
                windows.append(self._enqueue(id))
        except BaseException:  # a cycle: take back what was enqueued
            for id, window in zip(ids, windows, strict=False):
                if window is not None:
                    self._withdraw(window, id)
            raise
        cache = self._cache
        values: list[Any] = [
            cache[id] if window is None else None  # type: ignore[index]
            for id, window in zip(ids, windows, strict=True)
        ]
        try:
            for i, (id, window) in enumerate(zip(ids, windows, strict=True)):
                if window is None:
                    continue
                if window.state != DONE:
                    await window.signal.wait()
                values[i] = self._outcome(window, id)
                windows[i] = None
        except BaseException:
            for id, window in zip(ids, windows, strict=True):
                if window is not None and window.state < LOADING:
                    self._withdraw(window, id)
            raise
        return values

    # -------------------------------------------------------------------- cache

    def clear(self, id: K) -> Loader[K, V]:
        """Forget the cached value of `id`, if any; no-op without a cache.

        A `batch_load` call running for `id` now does not put its value in the
        cache, and later loads of `id` do not share it: they load `id` again.

        Returns:
            The loader itself, so that calls chain: `loader.clear(k).prime(k, v)`.
        """
        if self._cache is not None:
            self._cache.pop(id, None)
            self._inflight.pop(id, None)
        return self

    def clear_all(self) -> Loader[K, V]:
        """Forget every cached value; no-op without a cache.

        The `batch_load` calls running now do not put their values in the
        cache, and later loads do not share them.

        Returns:
            The loader itself.
        """
        if self._cache is not None:
            self._cache.clear()
        idle, self._idle = self._idle, []
        for signal in idle:
            signal.set()  # the idle workers see STOPPED and end
            self._inflight.clear()
        return self

    def prime(self, id: K, value: V) -> Loader[K, V]:
        """Cache `value` for `id`, unless a value is cached or being loaded for
        it already (as DataLoader does; `clear(id)` first to replace one).
        No-op without a cache.

        Returns:
            The loader itself.

        Raises:
            TypeError: `id` is None or not hashable, or `value` is an exception
                (failures are never cached).
            keybatch.ProcessorStopped: The loader is closed.
        """
        self._check_id(id)
        if self._state == STOPPED:
            raise keybatch.ProcessorStopped("the loader is closed")
        if isinstance(value, BaseException):
            raise TypeError(
                "prime() cannot cache an exception: failures are not cached"
            )
        cache = self._cache
        if cache is not None and id not in cache and id not in self._inflight:
            cache[id] = value
        return self

    def statistics(self) -> LoaderStatistics:
        """Return a snapshot of the loader's counters."""
        return LoaderStatistics(
            loads=self._loads + self._hits,
            cache_hits=self._hits,
            shared_loads=self._shared,
            batches=self._batches,
            ids_loaded=self._ids_loaded,
            failed_batches=self._failed,
            missing=self._missing,
            batches_in_flight=self._in_flight,
            cached=0 if self._cache is None else len(self._cache),
            failed_ids=self._failed_ids,
        )

    # ---------------------------------------------------------------- internals

    def _check_id(self, id: object) -> None:
        if id is None:
            raise TypeError("a loader id cannot be None")
        hash(id)  # TypeError for an unhashable id, before anything changes

    def _enqueue(self, id: K) -> Window | None:
        """Put `id` in a window (or find it cached): None for a cache hit."""
        if id is None:
            raise TypeError("a loader id cannot be None")
        hash(id)
        # Only a task inside batch_load has a chain: skip the lookup when no
        # batch_load runs.
        chain = self._chain.get() if self._in_flight else ()
        if self._state != RUNNING and not (chain and self._state == CLOSING):
            raise keybatch.ProcessorStopped("the loader is closed")
        cache = self._cache
        if cache is not None and id in cache:
            self._hits += 1
            return None
        self._loads += 1  # loads that are not hits
        if cache is not None:
            window = self._inflight.get(id)
            if window is not None:
                if window.state == LOADING:
                    if window in chain:
                        self._loads -= 1
                        raise RuntimeError(
                            f"batch_load waits for id {id!r}, which it is loading"
                            " itself: a cycle"
                        )
                    self._shared += 1
                else:
                    window.ids[id] += 1
                    if chain:
                        self._help(window)
                return window
        window = self._open
        if window is None:
            window = self._open_window()
        ids = window.ids
        count = ids.get(id)
        if count is None:
            ids[id] = 1
            if cache is not None:
                self._inflight[id] = window
            if self._max_batch is not None and len(ids) >= self._max_batch:
                self._close_open(window)
        else:
            ids[id] = count + 1
        if chain:
            self._help(window)
        return window

    def _open_window(self) -> Window:
        max_wait = self._max_wait
        window = Window(
            self._new_signal(), self._clock() + max_wait if max_wait else 0.0
        )
        self._open = window
        self._unfinished += 1
        if self._idle:
            self._idle.pop().set()
        return window

    def _close_open(self, window: Window) -> None:
        # The open window is full (or the loader is closing): no more ids.
        self._open = None
        window.state = CLOSED
        if window.claimed:
            if window.wake is not None:
                window.wake.set()  # its worker stops waiting for max_wait
        else:
            self._ready.append(window)
            if self._idle:
                self._idle.pop().set()

    def _help(self, window: Window) -> None:
        # A load made inside batch_load joined `window`: if no worker has
        # claimed it, every worker may be blocked in a batch_load waiting for
        # it, so a helper task runs it (beyond `concurrency`).
        if not window.claimed and not window.helped and window.state < LOADING:
            window.helped = True
            self._spawn(self._run_helper, window)

    def _withdraw(self, window: Window, id: K) -> None:
        # A caller gave up before the window's batch_load started.
        ids = window.ids
        count = ids.get(id, 0)
        if count > 1:
            ids[id] = count - 1
        elif count == 1:
            del ids[id]
            if self._inflight.get(id) is window:
                del self._inflight[id]

    def _outcome(self, window: Window, id: K) -> V:
        error = window.error
        if error is not None:
            if isinstance(error, keybatch.ProcessorStopped):
                raise keybatch.ProcessorStopped(
                    f"the loader was torn down before id {id!r} was loaded"
                ) from None
            raise BatchLoadError(id, f"batch_load failed for id {id!r}") from error
        value = window.values.get(id, _MISSING)
        if value is _MISSING:
            raise KeyError(id)
        if isinstance(value, Exception):
            raise LoadFailed(id, f"batch_load failed id {id!r}") from value
        return value  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ workers

    def _take(self) -> Window | None:
        if self._ready:
            window = self._ready.popleft()
            window.claimed = True
            return window
        open_window = self._open
        if open_window is not None and not open_window.claimed:
            open_window.claimed = True
            return open_window
        return None

    async def _work(self, *, task_status: TaskStatus[None]) -> None:
        """One of the `concurrency` workers; reports itself started once parked.

        It runs shielded for its whole life: a batch_load in flight is never
        cut short by the teardown, which instead wakes the idle workers and
        lets them see that the loader stopped. (One shield per worker, not one
        per batch: entering a cancel scope costs more than a small batch.)
        """
        with anyio.CancelScope(shield=True):
            starting = True
            while self._state != STOPPED:
                window = None if starting else self._take()
                if window is None:
                    signal = self._new_signal()
                    self._idle.append(signal)
                    if starting:
                        task_status.started()
                        starting = False
                    await signal.wait()
                    continue
                await self._serve(window)

    async def _run_helper(self, window: Window) -> None:
        # A helper for a window holding nested loads (see _help), shielded
        # like a worker.
        if window.claimed or window.state >= LOADING:
            return  # a worker got to it first
        window.claimed = True
        if window.state == CLOSED:
            self._ready.remove(window)
        with anyio.CancelScope(shield=True):
            await self._serve(window)

    async def _serve(self, window: Window) -> None:
        if window.state == OPEN:
            if self._max_wait and self._state == RUNNING:
                delay = window.deadline - self._clock()
                if delay > 0:
                    wake = window.wake = self._new_signal()
                    with anyio.move_on_after(delay):
                        await wake.wait()
                    if window.state == DONE:  # the loader stopped meanwhile
                        return
            if window.state == OPEN:
                self._open = None
                window.state = CLOSED
        ids = list(window.ids)
        if not ids:  # every caller withdrew
            self._finish(window)
            return
        window.state = LOADING
        self._in_flight += 1
        self._batches += 1
        self._ids_loaded += len(ids)
        token = self._chain.set((*self._chain.get(), window))
        try:
            values = await self._batch_load(ids)  # type: ignore[arg-type]
            if not isinstance(values, Mapping):
                raise TypeError(
                    "batch_load must return a mapping from id to value, got"
                    f" {type(values).__name__}"
                )
        except Exception as exc:
            self._failed += 1
            window.error = exc
        except BaseException as exc:
            self._failed += 1
            window.error = exc
            # Inside the shield, a cancellation is batch_load's own doing: a
            # failure like any other. KeyboardInterrupt and the like end the
            # loader: raised out of the block, once it is torn down (raised
            # here, asyncio would let it out of the event loop at once).
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                if self._fatal is None:
                    self._fatal = exc
                self._abort()
        else:
            window.values = values
            self._deliver(window, ids, values)
        finally:
            self._chain.reset(token)
            self._in_flight -= 1
            self._finish(window)

    def _deliver(
        self, window: Window, ids: list[Any], values: Mapping[Any, Any]
    ) -> None:
        cache = self._cache
        missing = failed = 0
        if cache is None:
            for id in ids:
                value = values.get(id, _MISSING)
                if value is _MISSING:
                    missing += 1
                elif isinstance(value, Exception):
                    failed += 1
        else:
            inflight = self._inflight
            for id in ids:
                value = values.get(id, _MISSING)
                mine = inflight.get(id) is window
                if mine:  # not cleared meanwhile, not loaded again since
                    del inflight[id]
                if value is _MISSING:
                    missing += 1
                elif isinstance(value, Exception):
                    failed += 1
                elif mine:
                    cache[id] = value
        self._missing += missing
        self._failed_ids += failed

    def _finish(self, window: Window) -> None:
        if window.state == DONE:
            return
        if self._cache is not None and window.error is not None:
            inflight: dict[Any, Window] = self._inflight
            for id in window.ids:
                if inflight.get(id) is window:
                    del inflight[id]
        window.state = DONE
        window.signal.set()
        if window.wake is not None:
            window.wake.set()  # its worker stops waiting for max_wait
        self._unfinished -= 1
        if self._unfinished == 0 and self._all_done is not None:
            self._all_done.set()

    # ------------------------------------------------------------------ closing

    async def _drain(self) -> None:
        """Leaving the block: refuse new loads, run what is asked for, wait.

        Cancellation: raised here (the caller tears down).
        """
        self._state = CLOSING
        self._hit_cache = None
        window = self._open
        if window is not None:
            self._close_open(window)
        if self._unfinished:
            self._all_done = self._new_signal()
            await self._all_done.wait()

    def _stop(self) -> None:
        """Teardown: the windows not loading fail with ProcessorStopped; the
        loader answers nothing any more (cache dropped)."""
        self._state = STOPPED
        self._hit_cache = None
        stopped = keybatch.ProcessorStopped("the loader was torn down")
        windows = list(self._ready)
        self._ready.clear()
        if self._open is not None:
            windows.append(self._open)
            self._open = None
        for window in windows:
            if window.state < LOADING:
                window.error = stopped
                self._finish(window)
        if self._cache is not None:
            self._cache.clear()
        idle, self._idle = self._idle, []
        for signal in idle:
            signal.set()  # the idle workers see STOPPED and end
