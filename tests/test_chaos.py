"""Chaos: a hypothesis state machine drives a processor under faults.

The machine runs random ``run``/``submit`` calls over a few keys, injects load
and save failures, hangs (timeouts), latency and cancellations inside load and
save, cancels callers at any point, flushes, and stops the processor (gracefully
or by cancellation) at random moments. After every step the recorded history
is checked (``keybatch.testing.Recorder.check``); at the end, with the
processor stopped, nothing may be lost, applied twice, or left behind.

Set KEYBATCH_CHAOS_EXAMPLES and KEYBATCH_CHAOS_STEPS to run more examples
(default 60) or longer ones (default at most 40 steps).

The processor lives in a trio run on a background thread, under a
``MockClock``: time stands still between steps and moves only in the
``advance`` rule, which turns autojump on for that virtual interval. Each step
runs on the trio thread through ``trio.from_thread`` and returns once every
task is blocked, so steps are deterministic and shrink well.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import keybatch
from keybatch import testing as kt

KEYS = ("a", "b", "c")


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

EXPECTED = (keybatch.KeybatchError, ValueError)


class Chaos:
    """The trio side: a processor, its callers, and the checks."""

    def __init__(self, clock: trio.testing.MockClock) -> None:
        self.clock = clock
        self.store: kt.MemoryStore[list[int]] = kt.memory_store(lambda key: [])
        self.rec = kt.recorder()
        self.processor: keybatch.Processor[list[int]] | None = None
        self.proc_scope = trio.CancelScope()
        self.stop_requested = trio.Event()
        self.closed = trio.Event()
        self.callers: list[trio.CancelScope] = []
        self.busy = 0  # caller tasks still running
        self.idle = trio.Event()
        self.pendings: list[keybatch.Pending[Any]] = []
        self.max_pending: int | None = None
        self.nursery: trio.Nursery | None = None

    async def main(self, started: Callable[[], None], finish: trio.Event) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            started()
            await finish.wait()
            nursery.cancel_scope.cancel()

    def raising_hook(self, report: keybatch.BatchReport) -> None:
        if report.key == "c":
            raise RuntimeError("a broken on_batch hook (logged and ignored)")

    async def save(self, key: str, resource: list[int]) -> None:
        await self.store.save(key, resource)

    async def settle(self) -> None:
        self.clock.autojump_threshold = math.inf
        await trio.testing.wait_all_tasks_blocked()

    # -- processor

    async def open(self, options: dict[str, Any], fault_rate: float) -> None:
        assert self.nursery is not None
        self.max_pending = options.get("max_pending")
        if fault_rate:
            self.store.inject("both", probability=fault_rate, error=ConnectionError)
        await self.nursery.start(self._processor, options)
        await self.settle()

    async def _processor(
        self, options: dict[str, Any], task_status: trio.TaskStatus[None]
    ) -> None:
        try:
            with self.proc_scope:
                async with keybatch.open_processor(
                    load=self.rec.wrap_load(self.store.load),
                    save=self.rec.wrap_save(self.save),
                    **options,
                ) as processor:
                    self.processor = processor
                    task_status.started()
                    await self.stop_requested.wait()
        finally:
            self.closed.set()

    # -- callers

    async def _caller(self, scope: trio.CancelScope, call: Awaitable[Any]) -> None:
        try:
            with scope, contextlib.suppress(*EXPECTED):
                await call
        finally:
            self.busy -= 1
            if not self.busy:
                self.idle.set()
            self.callers.remove(scope)

    def _spawn(self, call: Awaitable[Any], cancel_after: float | None = None) -> None:
        assert self.nursery is not None
        scope = trio.CancelScope()
        self.busy += 1
        if self.idle.is_set():
            self.idle = trio.Event()
        if cancel_after is not None:
            scope.deadline = trio.current_time() + cancel_after
        self.callers.append(scope)
        self.nursery.start_soon(self._caller, scope, call)

    async def run(self, key: str, op: str, x: int, cancel_after: float | None) -> None:
        assert self.processor is not None
        fn, takes_x = OPS[op]
        args = (x,) if takes_x else ()
        self._spawn(self.rec.run(self.processor, key, fn, *args), cancel_after)
        await self.settle()

    async def submit(self, key: str, op: str, x: int, wait: bool) -> None:
        assert self.processor is not None
        fn, takes_x = OPS[op]
        args = (x,) if takes_x else ()
        try:
            pending = self.rec.submit(self.processor, key, fn, *args)
        except (keybatch.Overloaded, keybatch.ProcessorStopped):
            return
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
        self._spawn(self.processor.flush())
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
        elif kind == "cancel":
            options["cancel"] = self.proc_scope
        self.store.inject(operation, **options)  # type: ignore[arg-type]
        await self.settle()

    async def advance(self, dt: float) -> None:
        self.clock.autojump_threshold = 0
        await trio.sleep(dt)
        await self.settle()

    async def stop(self) -> None:
        self.stop_requested.set()
        await self.settle()

    async def cancel_processor(self) -> None:
        self.proc_scope.cancel()
        await self.settle()

    # -- checks

    def check_now(self) -> None:
        self.rec.check(self.store.data)
        if self.processor is None:
            return
        stats = self.processor.statistics()
        assert stats.pending_operations >= 0
        assert 0 <= stats.active_batches <= stats.keys <= len(KEYS)
        if self.max_pending is not None:
            assert stats.pending_operations <= self.max_pending
        if self.closed.is_set():
            assert (stats.keys, stats.active_batches, stats.pending_operations) == (
                0,
                0,
                0,
            )
            assert all(p.done() for p in self.pendings)

    async def finish(self) -> None:
        if self.processor is not None:
            self.stop_requested.set()
            self.clock.autojump_threshold = 0
            with trio.move_on_after(3600) as timeout:
                await self.closed.wait()
                if self.busy:
                    await self.idle.wait()
            assert not timeout.cancelled_caught, "stuck: stop or a caller never ended"
            self.clock.autojump_threshold = math.inf
            await self.rec.collect()
        self.rec.check(self.store.data, complete=True)
        self.check_now()
        assert self.rec.pending_unobserved() == 0
        assert not _tasks_named("keybatch worker")


def _tasks_named(prefix: str) -> list[trio.lowlevel.Task]:
    found = []
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if task is None:
            continue
        if task.name.startswith(prefix):
            found.append(task)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return found


class ChaosMachine(RuleBasedStateMachine):
    chaos_class = Chaos

    def __init__(self) -> None:
        super().__init__()
        self.clock = trio.testing.MockClock()
        self.chaos = self.chaos_class(self.clock)
        self.token: trio.lowlevel.TrioToken | None = None
        self.finish_event: trio.Event | None = None
        self.error: BaseException | None = None
        started = threading.Event()

        async def main() -> None:
            self.token = trio.lowlevel.current_trio_token()
            self.finish_event = trio.Event()
            await self.chaos.main(started.set, self.finish_event)

        def thread() -> None:
            try:
                trio.run(main, clock=self.clock)
            except BaseException as exc:
                self.error = exc
                started.set()

        self.thread = threading.Thread(target=thread, name="chaos trio loop")
        self.thread.start()
        started.wait()
        self.open = False
        self.stopped = False
        self.steps = 0
        self.stop_after = 0
        self.called_after_stop = False

    def step(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self.steps += 1
        if self.error is not None:
            raise self.error
        trio.from_thread.run(fn, *args, trio_token=self.token)

    @initialize(
        min_duration=st.sampled_from([0, 0.01, 0.05]),
        max_duration=st.sampled_from([0.03, 0.1]),
        workers=st.integers(1, 3),
        max_ops=st.sampled_from([None, 1, 2]),
        hook_raises=st.booleans(),
        max_pending=st.sampled_from([None, None, 5]),
        fault_rate=st.sampled_from([0, 0.1, 0.3]),
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
        hook_raises: bool,
    ) -> None:
        self.stop_after = stop_after
        self.step(
            self.chaos.open,
            {
                "min_duration": min_duration,
                "max_duration": max(min_duration, max_duration),
                "workers": workers,
                "max_ops": max_ops,
                "max_pending": max_pending,
                "on_batch": self.chaos.raising_hook if hook_raises else None,
            },
            fault_rate,
        )
        self.open = True

    @precondition(lambda self: not self.stopped)
    @rule(
        key=st.sampled_from(KEYS),
        op=st.sampled_from(sorted(OPS)),
        x=st.integers(0, 9),
        cancel_after=st.sampled_from([None, None, 0, 0.005, 0.01, 0.03, 0.06]),
    )
    def run(self, key: str, op: str, x: int, cancel_after: float | None) -> None:
        self.step(self.chaos.run, key, op, x, cancel_after)

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

    @rule(
        operation=st.sampled_from(["load", "save"]),
        key=st.sampled_from(KEYS),
        kind=st.sampled_from(["error", "error", "hang", "slow", "cancel"]),
        nth=st.integers(1, 3),
    )
    def inject(self, operation: str, key: str, kind: str, nth: int) -> None:
        self.step(self.chaos.inject, operation, key, kind, nth)

    @rule(dt=st.sampled_from([0.001, 0.005, 0.01, 0.02, 0.05, 0.1]))
    def advance(self, dt: float) -> None:
        self.step(self.chaos.advance, dt)

    def may_stop(self) -> bool:
        return not self.stopped and self.steps >= self.stop_after

    @precondition(may_stop)
    @rule()
    def stop(self) -> None:
        self.stopped = True
        self.step(self.chaos.stop)

    @precondition(may_stop)
    @rule()
    def cancel_processor(self) -> None:
        self.stopped = True
        self.step(self.chaos.cancel_processor)

    @invariant()
    def history_is_valid(self) -> None:
        if self.error is not None:
            raise self.error
        trio.from_thread.run_sync(self.chaos.check_now, trio_token=self.token)

    def teardown(self) -> None:
        try:
            if self.error is None and self.token is not None:
                self.step(self.chaos.finish)
        finally:
            if self.token is not None and self.finish_event is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(
                        self.finish_event.set, trio_token=self.token
                    )
            self.thread.join()
        if self.error is not None:
            raise self.error


ChaosMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("KEYBATCH_CHAOS_EXAMPLES", "60")),
    stateful_step_count=int(os.environ.get("KEYBATCH_CHAOS_STEPS", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestChaos = ChaosMachine.TestCase


def test_the_machine_can_fail() -> None:
    """A machine whose store loses saves must be caught: the checks are live."""

    class LosingChaos(Chaos):
        async def save(self, key: str, resource: list[int]) -> None:
            await self.store.save(key, resource)
            del self.store.data[key]  # a store that forgets what it saved

    class LosingMachine(ChaosMachine):
        chaos_class = LosingChaos

    machine = LosingMachine()
    with pytest.raises(kt.HistoryViolation, match="the store holds"):
        try:
            machine.open_processor(0, 0.1, 1, None, None, 0, 10, False)
            machine.run("a", "append", 1, None)
            machine.advance(0.01)
            machine.history_is_valid()
        finally:
            machine.teardown()
