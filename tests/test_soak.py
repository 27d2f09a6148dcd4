"""Soak: a million operations over ten thousand keys with 1% faults.

Marked ``soak`` and excluded from the default run; run it with
``python -m pytest -m soak`` (or the benchmarks' ``--full`` mode). A small
version of the same test runs in the default suite so the code stays working.

The check is exact and cheap enough for a million operations. Each resource is
``[count, sum_of_ids, last_id, order_violations, load_number]``. An operation
adds its id, counts an order violation if its id is not above the last one
applied (ids grow in call order), and notes which load (batch) it was applied
to; every save that succeeds marks its load number as saved. At the end, per
key, the saved count and sum must equal those of exactly the operations
applied once to a batch that was saved; every operation reported successful
must be among them, and every one reported failed must not.
"""

from __future__ import annotations

import gc
import itertools
import os
import random
import tracemalloc
from array import array
from collections.abc import Hashable
from typing import Any

import pytest
import trio
import trio.testing

import keybatch
from keybatch import testing as kt

pytestmark = pytest.mark.trio

# Outcome codes.
UNKNOWN, OK, NOT_APPLIED, SAVE_FAILED, CANCELLED = 0, 1, 2, 3, 4


def _task_count() -> int:
    count = 0
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if task is None:
            continue
        count += 1
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return count


class Soak:
    def __init__(self, operations: int, keys: int, seed: int) -> None:
        self.n = operations
        self.keys = keys
        self.rng = random.Random(seed)
        self.store: kt.MemoryStore[list[int]] = kt.memory_store(
            lambda key: [0, 0, -1, 0, 0], seed=seed
        )
        # 1% of loads and saves fail: errors, and a few hang past the deadline.
        self.store.inject("both", probability=0.009, error=ConnectionError)
        self.store.inject("both", probability=0.001, hang=True)
        self.applications = bytearray(operations)
        self.batch_of = array("l", bytes(8 * operations))
        self.key_of = array("l", bytes(8 * operations))
        self.outcome = bytearray(operations)
        self.saved_loads = bytearray(4 * operations + 16)
        self.load_numbers = itertools.count(1)
        self.ids = itertools.count()

    async def load(self, key: Hashable) -> list[int]:
        resource = await self.store.load(key)
        resource[4] = next(self.load_numbers)
        return resource

    async def save(self, key: Hashable, resource: list[int]) -> None:
        await self.store.save(key, resource)
        self.saved_loads[resource[4]] = 1

    def op(self, resource: list[int], op_id: int) -> int:
        resource[0] += 1
        resource[1] += op_id
        if op_id <= resource[2]:
            resource[3] += 1
        resource[2] = op_id
        self.applications[op_id] += 1
        self.batch_of[op_id] = resource[4]
        return resource[0]

    async def caller(self, processor: keybatch.Processor[list[int]], ops: int) -> None:
        rng = self.rng
        for _ in range(ops):
            op_id = next(self.ids)
            # Skewed like real traffic: a few hot keys, a long tail.
            key = int(self.keys * rng.random() ** 3)
            self.key_of[op_id] = key
            with trio.CancelScope() as scope:
                if rng.random() < 0.002:  # cancel the caller at some point
                    scope.deadline = trio.current_time() + rng.choice((0, 0.005, 0.02))
                try:
                    await processor.run(f"key:{key}", self.op, op_id)
                    code = OK
                except keybatch.SaveError:
                    code = SAVE_FAILED
                except (keybatch.LoadError, keybatch.ProcessorStopped):
                    code = NOT_APPLIED
            self.outcome[op_id] = CANCELLED if scope.cancelled_caught else code

    def verify(self) -> None:
        count = [0] * self.keys
        total = [0] * self.keys
        problems: list[str] = []
        for op_id in range(self.n):
            applied = self.applications[op_id]
            saved = applied == 1 and self.saved_loads[self.batch_of[op_id]] == 1
            code = self.outcome[op_id]
            if applied > 1:
                problems.append(f"op {op_id} applied {applied} times")
            if code == UNKNOWN:
                problems.append(f"op {op_id} has no outcome (lost)")
            elif code == OK and not saved:
                problems.append(f"op {op_id} reported successful, not saved")
            elif code == NOT_APPLIED and applied:
                problems.append(f"op {op_id} reported not applied, but was")
            elif code == SAVE_FAILED and (not applied or saved):
                problems.append(f"op {op_id} got SaveError, wrongly")
            if saved:
                key = self.key_of[op_id]
                count[key] += 1
                total[key] += op_id
            if len(problems) > 20:
                break
        for key in range(self.keys):
            state = self.store.data.get(f"key:{key}", [0, 0, -1, 0, 0])
            if state[:2] != [count[key], total[key]] or state[3]:
                problems.append(
                    f"key {key}: saved {state}, expected count {count[key]}"
                    f" sum {total[key]} and no order violation"
                )
            if len(problems) > 20:
                break
        assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("operations", "keys", "callers"),
    [
        pytest.param(2_000, 50, 20, id="small"),
        pytest.param(
            int(os.environ.get("KEYBATCH_SOAK_OPS", "1000000")),
            int(os.environ.get("KEYBATCH_SOAK_KEYS", "10000")),
            1000,
            id="million",
            marks=pytest.mark.soak,
        ),
    ],
)
async def test_soak_nothing_lost_nothing_twice_nothing_left(
    operations: int, keys: int, callers: int, autojump_clock: Any
) -> None:
    soak = Soak(operations, keys, seed=2026)
    gc.collect()
    tasks_before = _task_count()
    tracemalloc.start()
    try:
        baseline = tracemalloc.take_snapshot()
        async with keybatch.open_processor(
            load=soak.load, save=soak.save, min_duration=0.01, max_duration=0.05
        ) as processor:
            assert _task_count() == tasks_before + processor.statistics().workers
            async with trio.open_nursery() as nursery:
                for _ in range(callers):
                    nursery.start_soon(soak.caller, processor, operations // callers)
        stats = processor.statistics()
        assert _task_count() == tasks_before  # no task left
        assert (stats.keys, stats.active_batches, stats.pending_operations) == (
            0,
            0,
            0,
        )
        assert stats.operations_done + stats.operations_withdrawn == operations
        faults = soak.store.failures / (soak.store.loads + soak.store.saves)
        assert 0.005 < faults < 0.015
        soak.verify()
        soak.store.data.clear()  # the saved resources are the store's, not a leak
        del processor, nursery
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()

    # Memory back to the baseline. trio's deadline heap drops expired cancel
    # scopes lazily, so a bounded number of them (allocated by keybatch's load
    # and save deadlines) may still be there; a leak per key or per operation
    # would be megabytes.
    def grown(pattern: str) -> int:
        only = [tracemalloc.Filter(True, pattern)]
        diff = after.filter_traces(only).compare_to(
            baseline.filter_traces(only), "filename"
        )
        return sum(stat.size_diff for stat in diff)

    assert grown("*/keybatch/*") < 64 * 1024
    assert grown("*/trio/*") < 512 * 1024
    everything_else = [
        tracemalloc.Filter(False, "*/keybatch/*"),
        tracemalloc.Filter(False, "*/trio/*"),
        tracemalloc.Filter(False, tracemalloc.__file__),
    ]
    rest = after.filter_traces(everything_else).compare_to(
        baseline.filter_traces(everything_else), "filename"
    )
    rest_growth = sum(stat.size_diff for stat in rest)
    print(  # shown with -s
        f"soak: {operations} ops, {keys} keys, {stats.batches_done} batches,"
        f" faults {faults:.2%}; memory after vs baseline: keybatch"
        f" {grown('*/keybatch/*')} B, trio {grown('*/trio/*')} B,"
        f" everything else {rest_growth} B"
    )
    assert rest_growth < 256 * 1024, rest[:5]


@pytest.mark.parametrize(
    ("bug", "message"),
    [("lose a save", "expected count"), ("apply twice", "applied 2 times")],
)
async def test_soak_check_can_fail(bug: str, message: str, autojump_clock: Any) -> None:
    class Broken(Soak):
        async def save(self, key: Hashable, resource: list[int]) -> None:
            if bug == "lose a save" and resource[4] == 7:
                self.saved_loads[resource[4]] = 1  # claims success, writes nothing
                await trio.lowlevel.checkpoint()
                return
            await super().save(key, resource)

        def op(self, resource: list[int], op_id: int) -> int:
            if bug == "apply twice" and op_id == 5:
                super().op(resource, op_id)
            return super().op(resource, op_id)

    soak = Broken(400, 10, seed=1)
    soak.store.clear_faults()
    async with keybatch.open_processor(
        load=soak.load, save=soak.save, min_duration=0.01
    ) as processor:
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(soak.caller, processor, 40)
    with pytest.raises(AssertionError, match=message):
        soak.verify()
