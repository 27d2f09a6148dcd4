"""Chaos: a hypothesis state machine drives a processor under faults (trio, asyncio).

The machine runs random ``run``/``submit`` calls over a few keys (alone, or in
bursts that queue for room under ``max_pending``), injects load and save
failures, hangs (timeouts), latency, writes that land before the save fails,
``Conflict`` (another writer saved first: the batch is replayed), a
``BaseException`` that kills the processor, and cancellations of the owner
inside load and save; makes ``on_batch`` raise (an ``Exception``, the
``BaseException``, or a cancellation of the owner); takes, holds across steps and
releases exclusive sections; cancels callers at any point; flushes (also during
the stop); and ends the processor at a random moment in one of the ways a
processor ends: leaving the block, ``aclose()`` from another task, the block
raising, the owner's scope cancelled now or by a deadline that passes later.

After every step the recorded history is checked (``keybatch.testing.Recorder.check``
with the store watched, so a write that landed counts) together with the
processor's statistics. At the end, with the processor stopped and every section
released, every call has exactly one outcome (its value, its op's exception,
``LoadError``, ``SaveError``, ``ProcessorStopped``, ``Overloaded`` or ``KeyBusy``
at the call, or its own cancellation), the store holds exactly the effects of
the batches whose write landed (nothing lost, nothing applied twice, a replay
applied each op once), per-key call order held, the statistics are back to zero
and no keybatch task is left.

Time is virtual and stands still between steps: it moves only in the
``advance`` rule (and at the end, to let the stop finish). trio runs on a
background thread under a ``MockClock``, each step entering it through
``trio.from_thread``; asyncio runs on a subclass of the ``AutojumpLoop`` of
``tests/conftest.py`` driven by ``run_until_complete`` one step at a time. A step
returns once every task is blocked, so steps are deterministic and shrink well.

Run it longer with ``KEYBATCH_CHAOS_EXAMPLES`` (examples per backend, default
30) and ``KEYBATCH_CHAOS_STEPS`` (default at most 40 steps), e.g.
``KEYBATCH_CHAOS_EXAMPLES=2000 python -m pytest tests/test_chaos.py``;
``KEYBATCH_CHAOS_SUMMARY=path.json`` writes the examples and steps run per backend,
with how many runs went through each labelled moment (``--hypothesis-show-statistics``
prints the same labels as percentages).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import selectors
import sys
import threading
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import keybatch
from keybatch import testing as kt

from .conftest import AutojumpLoop, _AutojumpSelector

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

KEYS = ("a", "b", "c")


class Fatal(BaseException):
    """A BaseException from load, save or on_batch: it kills the processor."""


class BodyError(Exception):
    """The owner's ``async with`` block raised."""


def append(resource: list[int], x: int) -> int:
    resource.append(x)
    return len(resource)


def append_even(resource: list[int], x: int) -> int:
    if x % 2:
        raise ValueError(f"odd: {x}")
    resource.append(x)
    return len(resource)


def double_last(resource: list[int]) -> int:
    if resource:
        resource[-1] *= 2
    return sum(resource)


OPS: dict[str, tuple[Callable[..., Any], bool]] = {
    "append": (append, True),
    "append_even": (append_even, True),
    "double_last": (double_last, False),
}

# What a caller may get besides a value and its own cancellation.
EXPECTED = (keybatch.KeybatchError, ValueError)


def _only_fatal(exc: BaseException) -> bool:
    """`exc` is Fatal, or a group with a Fatal and else only Fatal, the block's
    own BodyError (it raised as the processor died) or cancellations."""
    if isinstance(exc, Fatal):
        return True
    if not isinstance(exc, BaseExceptionGroup):
        return False
    leaves: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        else:
            leaves.append(e)
    cancelled = anyio.get_cancelled_exc_class()
    return any(isinstance(e, Fatal) for e in leaves) and all(
        isinstance(e, (Fatal, BodyError, cancelled)) for e in leaves
    )


# --------------------------------------------------------------------------- drivers


class TrioDriver:
    """trio on a background thread; steps enter it through trio.from_thread."""

    name = "trio"

    def __init__(self) -> None:
        self.clock = trio.testing.MockClock()
        self.token: trio.lowlevel.TrioToken | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def start(self, main: Callable[[Callable[[], None]], Awaitable[None]]) -> None:
        started = threading.Event()

        async def run() -> None:
            self.token = trio.lowlevel.current_trio_token()
            await main(started.set)

        def thread() -> None:
            try:
                trio.run(run, clock=self.clock)
            except BaseException as exc:
                self.error = exc
                started.set()

        self.thread = threading.Thread(target=thread, name="chaos trio loop")
        self.thread.start()
        started.wait()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def step(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self.raise_error()
        trio.from_thread.run(fn, *args, trio_token=self.token)

    def call(self, fn: Callable[[], Any]) -> Any:
        self.raise_error()
        return trio.from_thread.run_sync(fn, trio_token=self.token)

    async def settle(self) -> None:
        self.clock.autojump_threshold = math.inf
        await trio.testing.wait_all_tasks_blocked()

    async def advance(self, dt: float) -> None:
        self.clock.autojump_threshold = 0
        await trio.sleep(dt)
        await self.settle()

    def autojump(self, on: bool) -> None:
        self.clock.autojump_threshold = 0 if on else math.inf

    def keybatch_tasks(self) -> list[str]:
        found = []
        todo = [trio.lowlevel.current_root_task()]
        while todo:
            task = todo.pop()
            if task is None:
                continue
            if task.name.startswith("keybatch"):
                found.append(task.name)
            for nursery in task.child_nurseries:
                todo.extend(nursery.child_tasks)
        return found

    def close(self, finish: Callable[[], None]) -> None:
        if self.token is not None and self.thread is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(finish, trio_token=self.token)
            self.thread.join()
        self.raise_error()


class _SteppedSelector(_AutojumpSelector):
    """The AutojumpLoop's selector, held still between steps.

    Time jumps to the next timer only up to `limit`; a loop that would wait
    longer is idle, and wakes the `settle` waiters instead of sleeping.
    """

    def __init__(self) -> None:
        super().__init__()
        self.limit = 0.0
        self.idle: list[asyncio.Future[None]] = []

    def select(self, timeout: float | None = None) -> list[Any]:
        events = selectors.DefaultSelector.select(self, 0)
        if events or timeout == 0:
            return events
        if timeout is not None and self.now + timeout <= self.limit + 1e-9:
            self.now += timeout
            return []
        if self.idle:  # every task is blocked: wake the step that waits for it
            waiters, self.idle = self.idle, []
            for future in waiters:
                if not future.done():
                    future.set_result(None)
            return []
        events = selectors.DefaultSelector.select(self, 10.0)  # real I/O only
        if not events:
            raise RuntimeError("chaos: the asyncio loop would block forever")
        return events


class SteppedLoop(AutojumpLoop):
    """An AutojumpLoop whose virtual time moves only when the driver says."""

    def __init__(self) -> None:
        self._autojump = _SteppedSelector()
        asyncio.SelectorEventLoop.__init__(self, self._autojump)


class AsyncioDriver:
    """asyncio on a SteppedLoop in this thread; each step is one
    `run_until_complete`, and the loop stands still between steps."""

    name = "asyncio"

    def __init__(self) -> None:
        self.loop = SteppedLoop()
        self.selector: _SteppedSelector = self.loop._autojump  # type: ignore[assignment]
        self.main_task: asyncio.Task[None] | None = None

    def start(self, main: Callable[[Callable[[], None]], Awaitable[None]]) -> None:
        started = self.loop.create_future()

        def set_started() -> None:
            started.set_result(None)

        self.main_task = self.loop.create_task(main(set_started))  # type: ignore[arg-type]
        self.loop.run_until_complete(started)
        self.raise_error()

    def raise_error(self) -> None:
        task = self.main_task
        if task is not None and task.done():
            task.result()
            raise AssertionError("chaos: the main task ended early")

    def step(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self.raise_error()
        self.loop.run_until_complete(fn(*args))
        self.raise_error()

    def call(self, fn: Callable[[], Any]) -> Any:
        self.raise_error()
        return fn()

    async def settle(self) -> None:
        self.selector.limit = self.selector.now
        future = self.loop.create_future()
        self.selector.idle.append(future)
        await future

    async def advance(self, dt: float) -> None:
        self.selector.limit = self.selector.now + dt
        await asyncio.sleep(dt)
        await self.settle()

    def autojump(self, on: bool) -> None:
        self.selector.limit = math.inf if on else self.selector.now

    def keybatch_tasks(self) -> list[str]:
        return [
            t.get_name()
            for t in asyncio.all_tasks(self.loop)
            if t.get_name().startswith("keybatch")
        ]

    def close(self, finish: Callable[[], None]) -> None:
        loop = self.loop
        try:
            task = self.main_task
            if task is not None and not task.done():
                finish()
                loop.run_until_complete(task)
            left = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in left:
                t.cancel()
            if left:
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
                raise AssertionError(f"chaos: tasks left on the loop: {left}")
            if task is not None:
                task.result()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


Driver = TrioDriver | AsyncioDriver

# --------------------------------------------------------------------------- chaos


@dataclass
class SectionHolder:
    """A task that takes an exclusive section and holds it until released."""

    keys: tuple[str, ...]
    wait: bool
    timeout: float | None
    scope: Any
    release: Any  # anyio.Event
    called_at: float
    held: bool = False
    ended: bool = False
    error: BaseException | None = None


@dataclass
class Expect:
    """What the end of the run must show."""

    fatal_fired: int = 0  # Fatal raised by a fault or the hook
    body_raised: bool = False
    reports: list[keybatch.BatchReport] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)  # what the run went through


class Chaos:
    """The loop side: a processor, its callers, and the checks."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.store: kt.MemoryStore[list[int]] = kt.memory_store(lambda key: [])
        self.rec = kt.recorder()
        self.processor: keybatch.Processor[list[int]] | None = None
        self.options: dict[str, Any] = {}
        self.max_pending: int | None = None
        self.max_replays = 3
        self.versioned = False
        self.nursery: anyio.abc.TaskGroup | None = None
        self.finish_event: Any = None
        self.proc_scope: Any = None
        self.stop_requested: Any = None
        self.closed: Any = None
        self.raise_in_body = False
        self.body_done = False  # the owner's block ran to its end
        self.native_cancelled = False
        self.owner_exit: str | None = None
        self.callers: list[Any] = []  # cancel scopes of caller and section tasks
        self.busy = 0  # caller tasks still running
        self.idle: Any = None
        self.pendings: list[keybatch.Pending[Any]] = []
        self.sections: list[SectionHolder] = []
        self.hook_faults: dict[str, str] = {}
        self.expect = Expect()

    # -- the loop side's main task

    async def main(self, started: Callable[[], None]) -> None:
        self.finish_event = anyio.Event()
        self.stop_requested = anyio.Event()
        self.closed = anyio.Event()
        self.idle = anyio.Event()
        self.idle.set()
        self.proc_scope = anyio.CancelScope()
        async with anyio.create_task_group() as nursery:
            self.nursery = nursery
            started()
            await self.finish_event.wait()
            nursery.cancel_scope.cancel()

    def finish_main(self) -> None:
        self.finish_event.set()

    async def settle(self) -> None:
        await self.driver.settle()

    # -- hooks given to the processor

    def fatal(self) -> Fatal:
        self.expect.fatal_fired += 1
        return Fatal("a BaseException from the store")

    def on_batch(self, report: keybatch.BatchReport) -> None:
        self.expect.reports.append(report)
        kind = self.hook_faults.pop(report.key, None)  # type: ignore[arg-type]
        if kind == "error":
            raise RuntimeError("a broken on_batch hook (logged and ignored)")
        if kind == "fatal":
            self.expect.fatal_fired += 1
            raise Fatal("a BaseException from on_batch")
        if kind == "cancel_owner":
            self.expect.seen.add("owner cancelled by on_batch")
            self.proc_scope.cancel()

    async def save(self, key: Hashable, resource: list[int]) -> None:
        await self.store.save(key, resource)

    # -- processor

    async def open(self, options: dict[str, Any], fault_rate: float) -> None:
        assert self.nursery is not None
        self.options = options
        self.max_pending = options.get("max_pending")
        self.max_replays = options.get("max_replays", 3)
        if self.versioned:
            self.store = kt.memory_store(lambda key: [], versioned=True)
        self.rec.watch(self.store)
        if fault_rate:
            self.store.inject("both", probability=fault_rate, error=ConnectionError)
        await self.nursery.start(self._processor, options)
        await self.settle()

    async def _processor(
        self, options: dict[str, Any], *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        try:
            with self.proc_scope:
                try:
                    async with keybatch.open_processor(
                        load=self.rec.wrap_load(self.store.load),
                        save=self.rec.wrap_save(self.save),
                        **options,
                    ) as processor:
                        self.processor = processor
                        task_status.started()
                        try:
                            await self.stop_requested.wait()
                        except anyio.get_cancelled_exc_class():
                            self.moment("owner cancelled")  # whoever cancelled it
                            raise
                        self.body_done = True
                        if self.raise_in_body:
                            raise BodyError("the owner's block raised")
                    self.owner_exit = "returned" if self.body_done else "cut short"
                except BodyError:
                    self.owner_exit = "raised"
                except BaseException as exc:
                    if _only_fatal(exc):
                        self.owner_exit = "fatal"
                    elif self.native_cancelled and not self.proc_scope.cancel_called:
                        self.owner_exit = f"raised {type(exc).__name__}"
                    else:
                        raise
            if self.owner_exit is None:
                self.owner_exit = "cancelled"
        finally:
            self.closed.set()

    # -- callers

    async def _caller(self, scope: Any, call: Awaitable[Any]) -> None:
        try:
            with scope, contextlib.suppress(*EXPECTED):
                await call
        finally:
            self._caller_done(scope)

    def _caller_done(self, scope: Any) -> None:
        self.busy -= 1
        if not self.busy:
            self.idle.set()
        self.callers.remove(scope)

    def _new_caller(self, cancel_after: float | None = None) -> Any:
        scope = anyio.CancelScope()
        if cancel_after is not None:
            scope.deadline = anyio.current_time() + cancel_after
        self.busy += 1
        if self.idle.is_set():
            self.idle = anyio.Event()
        self.callers.append(scope)
        return scope

    def _spawn(self, call: Awaitable[Any], cancel_after: float | None = None) -> None:
        assert self.nursery is not None
        scope = self._new_caller(cancel_after)
        self.nursery.start_soon(self._caller, scope, call)

    def _run(self, key: str, op: str, x: int, cancel_after: float | None) -> None:
        assert self.processor is not None
        fn, takes_x = OPS[op]
        args = (x,) if takes_x else ()
        self._spawn(self.rec.run(self.processor, key, fn, *args), cancel_after)

    async def run(self, key: str, op: str, x: int, cancel_after: float | None) -> None:
        self._run(key, op, x, cancel_after)
        await self.settle()

    async def burst(self, calls: list[tuple[str, int]]) -> None:
        """Several callers at once: under max_pending most wait for room."""
        for key, x in calls:
            self._run(key, "append", x, None)
        await self.settle()

    async def submit(self, key: str, op: str, x: int, wait: bool) -> None:
        assert self.processor is not None
        fn, takes_x = OPS[op]
        args = (x,) if takes_x else ()
        stats = self.processor.statistics()
        waiting = _waiting_for_room(self.processor)
        try:
            pending = self.rec.submit(self.processor, key, fn, *args)
        except keybatch.Overloaded:
            # The room freed belongs to the callers waiting for it.
            assert self.max_pending is not None
            assert stats.pending_operations >= self.max_pending or waiting != 0, (
                stats,
                waiting,
            )
            return
        except keybatch.ProcessorStopped:
            assert stats.stopping or self.closed.is_set()
            return
        assert not stats.stopping
        if self.max_pending is not None:
            assert stats.pending_operations < self.max_pending, stats
            assert not waiting, "submit overtook a caller waiting for room"
        self.pendings.append(pending)
        if wait:
            self._spawn(self.rec.result(pending))
        await self.settle()

    async def cancel_caller(self, index: int) -> None:
        if self.callers:
            self.callers[index % len(self.callers)].cancel()
        await self.settle()

    async def flush(self) -> None:
        assert self.processor is not None
        if self.processor.statistics().stopping and not self.closed.is_set():
            self.expect.seen.add("flush during the stop")
        self._spawn(self.processor.flush())
        await self.settle()

    # -- exclusive sections

    async def take(
        self,
        keys: tuple[str, ...],
        wait: bool,
        timeout: float | None,  # noqa: ASYNC109 - exclusive()'s own argument
    ) -> None:
        assert self.nursery is not None
        assert self.processor is not None
        holder = SectionHolder(
            keys,
            wait,
            timeout,
            self._new_caller(),
            anyio.Event(),
            anyio.current_time(),
        )
        self.sections.append(holder)
        self.nursery.start_soon(self._hold, holder)
        await self.settle()

    async def _hold(self, holder: SectionHolder) -> None:
        assert self.processor is not None
        try:
            with holder.scope:
                try:
                    async with self.rec.exclusive(
                        self.processor,
                        *holder.keys,
                        wait=holder.wait,
                        timeout=holder.timeout,
                    ):
                        holder.held = True
                        try:
                            await holder.release.wait()
                        finally:
                            holder.held = False
                except (keybatch.KeyBusy, keybatch.ProcessorStopped) as exc:
                    holder.error = exc
        finally:
            holder.ended = True
            self._caller_done(holder.scope)
        busy = holder.error
        if isinstance(busy, keybatch.KeyBusy):
            assert busy.keys, busy
            assert set(busy.keys) <= set(holder.keys), busy
            if holder.wait:  # it waited exactly `timeout`
                assert holder.timeout is not None
                waited = anyio.current_time() - holder.called_at
                assert math.isclose(waited, holder.timeout, abs_tol=1e-6), waited

    async def release(self, index: int) -> None:
        live = [h for h in self.sections if not h.ended and not h.release.is_set()]
        if live:
            live[index % len(live)].release.set()
        await self.settle()

    # -- faults, time, stop

    async def inject(self, operation: str, key: str, kind: str, nth: int) -> None:
        options: dict[str, Any] = {"keys": key, "nth": nth}
        if kind == "error":
            options["error"] = ConnectionError
        elif kind == "hang":
            options["hang"] = True
        elif kind == "slow":
            options["latency"] = 0.02
        elif kind == "slower":  # past a short max_duration: a timeout
            options["latency"] = 0.06
        elif kind == "cancel":
            options["cancel"] = _Noting(self.proc_scope, self.expect.seen, operation)
        elif kind == "fatal":
            options["error"] = self.fatal
        elif kind == "landed":  # the write lands, then the save fails
            options["after"] = True
            options["error"] = ConnectionError
        elif kind == "landed_hang":  # the write lands, then the save hangs
            options["after"] = True
            options["hang"] = True
        elif kind == "conflict":  # another writer saves first (versioned store)
            options["external"] = lambda resource: [*resource, 100 + nth]
            if not self.versioned:
                options["error"] = keybatch.Conflict
        self.store.inject(operation, **options)  # type: ignore[arg-type]
        await self.settle()

    async def external_write(self, key: str, x: int) -> None:
        current = self.store.data.get(key, [])
        self.store.write(key, [*current, 200 + x])
        await self.settle()

    async def arm_hook(self, key: str, kind: str) -> None:
        self.hook_faults[key] = kind
        await self.settle()

    async def advance(self, dt: float) -> None:
        await self.driver.advance(dt)

    async def stop(self, how: str) -> None:
        self.moment("block raised" if how == "raise" else "block left")
        if how == "raise":
            self.raise_in_body = True
            self.expect.body_raised = True
        self.stop_requested.set()
        await self.settle()

    async def aclose(self) -> None:
        assert self.processor is not None
        self.moment("aclose called")
        self._spawn(self.processor.aclose())
        await self.settle()

    def moment(self, what: str) -> None:
        """Note what was going on when the processor was told to end."""
        assert self.processor is not None
        found = _phases(self.rec.events)
        if _waiting_for_room(self.processor):
            found.add("waiting for room")
        if any(h.held for h in self.sections):
            found.add("section held")
        for phase in sorted(found) or ["idle"]:
            self.expect.seen.add(f"{what} while {phase}")

    async def cancel_processor(self) -> None:
        self.proc_scope.cancel()
        await self.settle()

    async def native_cancel(self) -> None:
        """asyncio: `task.cancel()` on every worker task ("cancel all tasks")."""
        assert isinstance(self.driver, AsyncioDriver)
        self.moment("workers natively cancelled")
        self.native_cancelled = True
        for task in asyncio.all_tasks(self.driver.loop):
            if task.get_name().startswith("keybatch worker"):
                task.cancel()
        await self.settle()

    async def deadline(self, dt: float) -> None:
        self.proc_scope.deadline = anyio.current_time() + dt
        await self.settle()

    # -- checks

    def check_now(self) -> None:
        self.rec.check(self.store.data)
        if self.processor is None:
            return
        stats = self.processor.statistics()
        assert stats.pending_operations >= 0
        assert 0 <= stats.active_batches <= stats.keys <= len(KEYS), stats
        if self.max_pending is not None:
            assert stats.pending_operations <= self.max_pending, stats
        waiting = _waiting_for_room(self.processor)
        if waiting:
            self.expect.seen.add("callers waiting for room")
            if not stats.stopping:  # room is never left idle while callers wait
                assert self.max_pending is not None
                assert stats.pending_operations >= self.max_pending, (stats, waiting)
        held = sum(1 for h in self.sections if h.held)
        assert stats.exclusive_sections == held, (stats, held)
        conflicts = sum(
            1
            for e in self.rec.events
            if e.kind == kt.SAVE_FAILED and isinstance(e.error, keybatch.Conflict)
        )
        assert stats.conflicts == conflicts, (stats, conflicts)
        for report in self.expect.reports:
            assert 0 <= report.replays <= self.max_replays, report
            load_failed = isinstance(report.error, keybatch.LoadError)
            if load_failed and not report.replays:
                assert report.close_reason is None, report
            elif report.close_reason is None:  # only a load failure has none
                assert load_failed, report
                # (A replay's reload that failed keeps the batch's close reason.)
        if self.closed.is_set():
            assert (stats.keys, stats.active_batches, stats.pending_operations) == (
                0,
                0,
                0,
            ), stats
            assert all(p.done() for p in self.pendings)

    async def finish(self) -> None:
        for holder in self.sections:
            holder.release.set()
        if self.processor is not None:
            self.stop_requested.set()
            self.driver.autojump(True)
            with anyio.move_on_after(3600) as timeout:
                await self.closed.wait()
                if self.busy:
                    await self.idle.wait()
            self.driver.autojump(False)
            assert not timeout.cancel_called, (
                "stuck: the processor never closed or a caller never ended"
                f" (closed={self.closed.is_set()}, callers={self.busy})"
            )
            await self.rec.collect()
        self.rec.check(self.store.data, complete=True)
        self.check_now()
        assert self.rec.pending_unobserved() == 0
        if self.processor is not None:
            stats = self.processor.statistics()
            assert stats.exclusive_sections == 0, stats
            if self.expect.fatal_fired:
                assert self.owner_exit == "fatal", self.owner_exit
            else:
                assert self.owner_exit != "fatal"
            # The block never ends early without an exception (a swallowed
            # teardown), however the processor ended.
            assert self.owner_exit != "cut short", self.owner_exit
        assert not self.driver.keybatch_tasks()

    def labels(self) -> list[str]:
        """What the run went through, for `--hypothesis-show-statistics`."""
        seen = self.expect.seen
        if self.processor is None:
            return ["no processor (invalid example)"]
        seen.add(f"owner exit: {self.owner_exit}")
        if any(r.replays for r in self.expect.reports) or any(
            e.kind == kt.SAVE_FAILED and isinstance(e.error, keybatch.Conflict)
            for e in self.rec.events
        ):
            seen.add("Conflict")
        ops: dict[int, int] = {}
        for e in self.rec.events:
            if e.kind == kt.APPLY and e.op is not None:
                ops[e.op] = ops.get(e.op, 0) + 1
            elif e.kind == kt.OUTCOME and isinstance(e.error, keybatch.SaveError):
                landed = "may have landed" if e.error.may_have_landed else "refused"
                seen.add(f"SaveError ({landed})")
            elif e.kind == kt.OUTCOME and isinstance(e.error, keybatch.KeyBusy):
                seen.add("section: KeyBusy")
            elif e.kind == kt.HELD:
                seen.add("section held")
        if any(count > 1 for count in ops.values()):
            seen.add("an op replayed")
        return sorted(seen)


class _Noting:
    """A cancel scope for `inject(cancel=...)` that notes when it fires."""

    def __init__(self, scope: Any, seen: set[str], operation: str) -> None:
        self.scope = scope
        self.seen = seen
        self.operation = operation

    def cancel(self) -> None:
        self.seen.add(f"owner cancelled inside {self.operation}")
        self.scope.cancel()


def _phases(events: list[kt.Event]) -> set[str]:
    """What is in flight at the end of a log: loading, window open, saving."""
    phase: dict[Hashable, str] = {}
    for e in events:
        if e.kind == kt.LOAD:
            phase[e.key] = "loading"
        elif e.kind == kt.LOADED:
            phase[e.key] = "window open"
        elif e.kind == kt.SAVE:
            phase[e.key] = "saving"
        elif e.kind in (kt.LOAD_FAILED, kt.SAVED, kt.SAVE_FAILED):
            phase[e.key] = "idle"
    return set(phase.values()) - {"idle"}


def _waiting_for_room(processor: keybatch.Processor[Any]) -> int | None:
    """Callers waiting for room (a private count; None if it moved)."""
    admission = getattr(getattr(processor, "_engine", None), "admission", None)
    waiting = getattr(admission, "waiting", None)
    return waiting if isinstance(waiting, int) else None


# --------------------------------------------------------------------------- machine


# Examples and steps run, per backend; written as JSON to the file named by
# KEYBATCH_CHAOS_SUMMARY (if set) after each example, for the record of a long run.
TOTALS: dict[str, dict[str, int]] = {}


def _tally(backend: str, steps: int, labels: list[str]) -> None:
    totals = TOTALS.setdefault(backend, {"examples": 0, "steps": 0})
    totals["examples"] += 1
    totals["steps"] += steps
    for label in labels:
        totals[label] = totals.get(label, 0) + 1
    path = os.environ.get("KEYBATCH_CHAOS_SUMMARY")
    if path:
        with open(path, "w") as f:
            json.dump(TOTALS, f, indent=1, sort_keys=True)


class ChaosMachine(RuleBasedStateMachine):
    chaos_class = Chaos
    driver_class: type[TrioDriver] | type[AsyncioDriver] = TrioDriver

    def __init__(self) -> None:
        super().__init__()
        self.driver = self.driver_class()
        self.chaos = self.chaos_class(self.driver)
        self.driver.start(self.chaos.main)
        self.open = False
        self.stopped = False
        self.deadline_set = False
        self.steps = 0
        self.stop_after = 0
        self.called_after_stop = False

    def step(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self.steps += 1
        self.driver.step(fn, *args)

    @initialize(
        min_duration=st.sampled_from([0, 0.01, 0.05]),
        max_duration=st.sampled_from([0.03, 0.1]),
        workers=st.integers(1, 3),
        max_ops=st.sampled_from([None, 1, 2]),
        hook=st.booleans(),
        max_pending=st.sampled_from([None, None, 1, 2, 5]),
        fault_rate=st.sampled_from([0, 0, 0.1, 0.3]),
        versioned=st.booleans(),
        max_replays=st.sampled_from([0, 1, 3]),
        stop_after=st.integers(4, 40),
    )
    def open_processor(
        self,
        min_duration: float,
        max_duration: float,
        workers: int,
        max_ops: int | None,
        max_pending: int | None,
        fault_rate: float,
        stop_after: int,
        hook: bool,
        versioned: bool = False,
        max_replays: int = 3,
    ) -> None:
        self.stop_after = stop_after
        self.chaos.versioned = versioned
        self.step(
            self.chaos.open,
            {
                "min_duration": min_duration,
                "max_duration": max(min_duration, max_duration),
                "workers": workers,
                "max_ops": max_ops,
                "max_pending": max_pending,
                "max_replays": max_replays,
                "on_batch": self.chaos.on_batch if hook else None,
            },
            fault_rate,
        )
        self.open = True

    # -- calls

    @precondition(lambda self: not self.stopped)
    @rule(
        key=st.sampled_from(KEYS),
        op=st.sampled_from(sorted(OPS)),
        x=st.integers(0, 9),
        cancel_after=st.sampled_from([None, None, 0, 0.005, 0.01, 0.03, 0.06]),
    )
    def run(self, key: str, op: str, x: int, cancel_after: float | None) -> None:
        self.step(self.chaos.run, key, op, x, cancel_after)

    @precondition(lambda self: not self.stopped)
    @rule(
        calls=st.lists(
            st.tuples(st.sampled_from(KEYS), st.integers(0, 9)), min_size=2, max_size=8
        )
    )
    def burst(self, calls: list[tuple[str, int]]) -> None:
        self.step(self.chaos.burst, calls)

    @precondition(lambda self: self.stopped and not self.called_after_stop)
    @rule(key=st.sampled_from(KEYS), x=st.integers(0, 9))
    def call_after_stop(self, key: str, x: int) -> None:
        self.called_after_stop = True
        self.step(self.chaos.run, key, "append", x, None)
        self.step(self.chaos.submit, key, "append", x, False)

    @precondition(lambda self: not self.stopped)
    @rule(
        key=st.sampled_from(KEYS),
        op=st.sampled_from(sorted(OPS)),
        x=st.integers(0, 9),
        wait=st.booleans(),
    )
    def submit(self, key: str, op: str, x: int, wait: bool) -> None:
        self.step(self.chaos.submit, key, op, x, wait)

    @rule(index=st.integers(0, 20))
    def cancel_caller(self, index: int) -> None:
        self.step(self.chaos.cancel_caller, index)

    @rule()
    def flush(self) -> None:
        self.step(self.chaos.flush)

    # -- exclusive sections

    @precondition(lambda self: not self.stopped)
    @rule(
        keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=3),
        wait=st.sampled_from([True, True, False]),
        timeout=st.sampled_from([None, None, 0, 0.01, 0.05]),
    )
    def take_section(self, keys: list[str], wait: bool, timeout: float | None) -> None:
        self.step(self.chaos.take, tuple(keys), wait, timeout)

    @rule(index=st.integers(0, 5))
    def release_section(self, index: int) -> None:
        self.step(self.chaos.release, index)

    # -- faults and time

    @rule(
        operation=st.sampled_from(["load", "save"]),
        key=st.sampled_from(KEYS),
        kind=st.sampled_from(
            [
                "error",
                "error",
                "hang",
                "slow",
                "slower",
                "cancel",
                "fatal",
                "landed",
                "landed_hang",
                "conflict",
                "conflict",
            ]
        ),
        nth=st.integers(1, 3),
    )
    def inject(self, operation: str, key: str, kind: str, nth: int) -> None:
        if kind in ("landed", "landed_hang", "conflict"):
            operation = "save"
        self.step(self.chaos.inject, operation, key, kind, nth)

    @precondition(lambda self: self.chaos.versioned)
    @rule(key=st.sampled_from(KEYS), x=st.integers(0, 9))
    def external_write(self, key: str, x: int) -> None:
        self.step(self.chaos.external_write, key, x)

    @rule(
        key=st.sampled_from(KEYS),
        kind=st.sampled_from(["error", "error", "fatal", "cancel_owner"]),
    )
    def arm_hook(self, key: str, kind: str) -> None:
        self.step(self.chaos.arm_hook, key, kind)

    @rule(dt=st.sampled_from([0.001, 0.005, 0.01, 0.02, 0.05, 0.1]))
    def advance(self, dt: float) -> None:
        self.step(self.chaos.advance, dt)

    # -- the end

    def may_stop(self) -> bool:
        return not self.stopped and self.steps >= self.stop_after

    @precondition(may_stop)
    @rule(how=st.sampled_from(["leave", "raise"]))
    def stop(self, how: str) -> None:
        self.stopped = True
        self.step(self.chaos.stop, how)

    @precondition(may_stop)
    @rule()
    def aclose(self) -> None:
        self.stopped = True
        self.step(self.chaos.aclose)

    @precondition(may_stop)
    @rule()
    def cancel_processor(self) -> None:
        self.stopped = True
        self.step(self.chaos.cancel_processor)

    @precondition(lambda self: self.may_stop() and not self.deadline_set)
    @rule(dt=st.sampled_from([0, 0.003, 0.01, 0.04]))
    def owner_deadline(self, dt: float) -> None:
        # The owner's scope times out later, at whatever moment that is.
        self.deadline_set = True
        self.step(self.chaos.deadline, dt)

    @precondition(lambda self: self.driver.name == "asyncio" and self.may_stop())
    @rule()
    def native_cancel_workers(self) -> None:
        self.stopped = True
        self.step(self.chaos.native_cancel)

    @invariant()
    def history_is_valid(self) -> None:
        self.driver.call(self.chaos.check_now)

    def teardown(self) -> None:
        try:
            self.driver.raise_error()
            self.step(self.chaos.finish)
            labels = self.driver.call(self.chaos.labels)
        finally:
            self.driver.close(self.chaos.finish_main)
        _tally(self.driver.name, self.steps, labels)
        with contextlib.suppress(InvalidArgument):  # outside hypothesis: no labels
            for label in labels:
                event(label)


class AsyncioChaosMachine(ChaosMachine):
    driver_class = AsyncioDriver


_settings = settings(
    max_examples=int(os.environ.get("KEYBATCH_CHAOS_EXAMPLES", "30")),
    stateful_step_count=int(os.environ.get("KEYBATCH_CHAOS_STEPS", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
ChaosMachine.TestCase.settings = _settings
AsyncioChaosMachine.TestCase.settings = _settings
TestChaosTrio = ChaosMachine.TestCase
TestChaosAsyncio = AsyncioChaosMachine.TestCase


# --------------------------------------------------------------------------- own tests


MACHINES = {"trio": ChaosMachine, "asyncio": AsyncioChaosMachine}


def _machine(backend: str, chaos_class: type[Chaos] = Chaos) -> ChaosMachine:
    base = MACHINES[backend]

    class Machine(base):  # type: ignore[valid-type,misc]
        pass

    Machine.chaos_class = chaos_class
    return Machine()  # type: ignore[no-any-return]


def _open(machine: ChaosMachine, **options: Any) -> None:
    defaults: dict[str, Any] = {
        "min_duration": 0,
        "max_duration": 0.1,
        "workers": 1,
        "max_ops": None,
        "max_pending": None,
        "fault_rate": 0,
        "stop_after": 10,
        "hook": False,
        "versioned": False,
        "max_replays": 3,
    }
    defaults.update(options)
    machine.open_processor(**defaults)


@pytest.mark.parametrize("backend", sorted(MACHINES))
def test_the_machine_can_fail(backend: str) -> None:
    """A machine whose store loses saves must be caught: the checks are live."""

    class LosingChaos(Chaos):
        async def save(self, key: Hashable, resource: list[int]) -> None:
            await self.store.save(key, resource)
            del self.store.data[key]  # a store that forgets what it saved

    machine = _machine(backend, LosingChaos)
    with pytest.raises(kt.HistoryViolation, match="the store holds"):
        try:
            _open(machine)
            machine.run("a", "append", 1, None)
            machine.advance(0.01)
            machine.history_is_valid()
        finally:
            machine.teardown()


@pytest.mark.parametrize("backend", sorted(MACHINES))
def test_the_machine_drives_each_ending(backend: str) -> None:
    """One scripted run per moment the issue names: waiting for room, loading,
    window open, saving; the owner cancelled; a Fatal; a replay; a section."""
    machine = _machine(backend)
    try:
        _open(machine, min_duration=0.05, workers=3, max_pending=2, versioned=True)
        machine.inject("load", "b", "slow", 1)
        machine.inject("save", "a", "conflict", 1)
        machine.submit("a", "append", 1, False)
        machine.take_section(["c"], True, None)  # held at once
        machine.run("c", "append", 5, None)  # queued behind the section
        machine.burst([("a", 2), ("b", 3), ("a", 4)])  # they wait for room
        machine.history_is_valid()
        machine.advance(0.05)
        machine.release_section(0)
        machine.advance(0.02)
        machine.history_is_valid()
        machine.cancel_processor()
        machine.history_is_valid()
    finally:
        machine.teardown()
    events = machine.chaos.rec.events
    assert any(e.kind == kt.HELD for e in events)
    assert any(e.kind == kt.EXTERNAL for e in events)


@pytest.mark.parametrize("backend", sorted(MACHINES))
def test_a_fatal_hook_kills_the_processor_and_every_call_ends(backend: str) -> None:
    machine = _machine(backend)
    try:
        _open(machine, min_duration=0.01, hook=True, workers=2)
        machine.arm_hook("a", "fatal")
        machine.run("a", "append", 1, None)
        machine.run("b", "append", 2, None)
        machine.run("b", "append", 3, None)
        machine.advance(0.01)
        machine.history_is_valid()
    finally:
        machine.teardown()
    assert machine.chaos.owner_exit == "fatal"


@pytest.mark.parametrize("backend", sorted(MACHINES))
@pytest.mark.parametrize("kind", ["cancel", "fatal"])
def test_teardown_during_a_replays_reload(backend: str, kind: str) -> None:
    """The long run's find (fixed in 9b517ad; test_chaos_regressions): the owner
    cancelled, or a BaseException raised, during a Conflict replay's reload."""
    machine = _machine(backend)
    try:
        _open(machine, min_duration=0.01, max_duration=0.03, versioned=True)
        machine.inject("load", "c", kind, 2)  # the replay's reload
        machine.submit("c", "append", 0, True)
        machine.advance(0.001)
        machine.external_write("c", 0)  # the save will conflict
        machine.history_is_valid()
    finally:
        machine.teardown()
    assert machine.chaos.owner_exit == ("fatal" if kind == "fatal" else "cancelled")
