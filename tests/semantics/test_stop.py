"""docs/semantics.md, point 10 (graceful stop: leaving the block, or `aclose`):
new calls raise ProcessorStopped; open batches close at once; every operation
accepted before the stop is applied and saved, or its caller gets its error;
when the stop returns no worker task and no key state is left, and no batch
starts afterwards."""

from __future__ import annotations

import anyio
import pytest

import keybatch

from ..helpers import (
    Account,
    Harness,
    Store,
    append,
    list_store,
    now,
    opener,
    settle,
    worker_task_names,
)

pytestmark = pytest.mark.anyio


async def test_calls_after_the_stop_raise_processor_stopped() -> None:
    store = list_store()
    async with opener(store) as processor:
        assert await processor.run("a", append, 1) == 1
    with pytest.raises(keybatch.ProcessorStopped):
        await processor.run("a", append, 2)
    with pytest.raises(keybatch.ProcessorStopped):
        processor.submit("a", append, 2)
    await processor.aclose()  # again: returns at once
    await processor.flush()  # nothing to wait for
    stats = processor.statistics()
    assert stats.stopping
    assert (stats.keys, stats.pending_operations, stats.operations_done) == (0, 0, 1)
    assert store.data == {"a": [1]}
    assert store.loads == 1


async def test_calls_during_the_stop_raise_processor_stopped() -> None:
    store = list_store()
    store.inject("save", latency=0.05)
    async with opener(store) as processor:
        processor.submit("a", append, 1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(processor.aclose)
            await settle()
            assert processor.statistics().stopping
            with pytest.raises(keybatch.ProcessorStopped):
                await processor.run("b", append, 2)
            with pytest.raises(keybatch.ProcessorStopped):
                processor.submit("b", append, 2)
        assert now() == 0.05  # the stop closed the window at once
    assert store.data == {"a": [1]}


async def test_the_stop_closes_open_batches_at_once() -> None:
    store = Store()
    done_at = []
    reports: list[keybatch.BatchReport] = []
    async with store.open(min_duration=100, on_batch=reports.append) as processor:

        async def call() -> None:
            await processor.run("k", Account.deposit, 1)
            done_at.append(now())

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await anyio.sleep(1)
            await processor.aclose()
            assert now() == 1.0
    assert done_at == [1.0]
    assert store.data == {"k": 1}
    assert [(r.operations, r.close_reason) for r in reports] == [(1, "stop")]


async def test_the_stop_waits_for_a_save_in_progress() -> None:
    store = Store(save_delay=2)
    async with store.open(min_duration=0.5, max_duration=5) as processor:
        async with anyio.create_task_group() as tg:
            tg.start_soon(processor.run, "k", Account.deposit, 1)
            await anyio.sleep(1)  # the batch closed at 0.5 and saves until 2.5
            await processor.aclose()
            assert now() == 2.5
    assert store.data == {"k": 1}


async def test_the_stop_saves_what_was_queued_behind_a_saving_batch() -> None:
    h = Harness()
    h.store.inject("save", keys="a", nth=1, latency=0.75)
    async with h.open(workers=1, min_duration=0.25, max_duration=5) as processor:
        async with anyio.create_task_group() as tg:
            tg.start_soon(h.call, processor, 0, "a", append, 1)
            await anyio.sleep(0.5)  # "a" saves from 0.25 to 1.0
            tg.start_soon(h.call, processor, 1, "a", append, 2)  # queued behind
            tg.start_soon(h.call, processor, 2, "b", append, 3)  # window open
            await settle()
            await processor.aclose()
            assert now() == 1.0
            # saved before aclose returned, and nothing is left
            assert h.store.data == {"a": [1, 2], "b": [3]}
            assert processor.statistics().keys == 0
    assert h.results == {0: 1, 1: 2, 2: 1}
    assert h.batches("a") == [1, 1]
    await h.check()


async def test_the_stop_is_idempotent_and_leaves_no_worker_and_no_key() -> None:
    async with keybatch.open_processor(workers=3) as processor:
        assert worker_task_names() == [f"keybatch worker {i}" for i in range(3)]
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(processor.run, f"k{i}", lambda r: None)
            await settle()
            assert processor.statistics().keys == 10
            await processor.aclose()
            assert worker_task_names() == []
            await processor.aclose()
        stats = processor.statistics()
        assert stats.stopping
        assert stats.keys == stats.pending_operations == stats.active_batches == 0
        assert stats.operations_done == 10
        assert stats.batches_done == 10
    await processor.aclose()
    assert worker_task_names() == []


async def test_a_save_failing_during_the_stop_fails_only_its_callers() -> None:
    store = list_store()
    store.inject("save", keys="a", error=RuntimeError)
    async with opener(store) as processor:
        doomed = processor.submit("a", append, 1)
        fine = processor.submit("b", append, 1)
    # Stopping closed both batches at once; "a"'s save failed, "b"'s worked.
    assert now() == 0
    with pytest.raises(keybatch.SaveError) as info:
        await doomed.result()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert await fine.result() == 1
    stats = processor.statistics()
    assert (stats.keys, stats.pending_operations, stats.save_failures) == (0, 0, 1)
    assert store.data == {"b": [1]}
