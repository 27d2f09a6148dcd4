"""docs/semantics.md, point 13 (memory): a key with no pending operation and no
batch in flight holds no state; a burst of distinct keys leaves nothing behind,
freed by refcounting alone."""

from __future__ import annotations

import gc
import tracemalloc

import anyio
import pytest

import keybatch

from ..helpers import Account, Store, settle

pytestmark = pytest.mark.anyio


async def test_keys_without_pending_work_hold_no_state() -> None:
    async with keybatch.open_processor(min_duration=0, workers=4) as processor:
        for chunk in range(10):
            async with anyio.create_task_group() as tg:
                for i in range(500):
                    tg.start_soon(processor.run, f"{chunk}:{i}", lambda r: None)
            stats = processor.statistics()
            assert stats.keys == stats.pending_operations == stats.active_batches == 0
            assert stats.max_worker_queue == 0
        assert processor.statistics().operations_done == 5_000


@pytest.mark.parametrize("ends", ["saved", "load failed", "withdrawn"])
async def test_a_key_holds_state_only_while_it_has_work(ends: str) -> None:
    store = Store(load_delay=0.25)
    if ends == "load failed":
        store.load_delay = 10  # past the deadline

    async with store.open(min_duration=1, max_duration=2) as processor:
        assert processor.statistics().keys == 0
        with anyio.move_on_after(0.5 if ends == "withdrawn" else 100):
            pending = processor.submit("k", Account.deposit, 1)
            await settle()
            stats = processor.statistics()
            assert (stats.keys, stats.pending_operations) == (1, 1)
            assert (stats.active_batches, stats.max_worker_queue) == (1, 1)
            if ends == "withdrawn":
                await processor.run("k", Account.deposit, 2)
            elif ends == "load failed":
                with pytest.raises(keybatch.LoadError):
                    await pending.result()
            else:
                assert await pending.result() == 1
        if ends == "withdrawn":
            await pending.result()
        await settle()
        stats = processor.statistics()
        assert (stats.keys, stats.pending_operations, stats.active_batches) == (0, 0, 0)
        assert stats.max_worker_queue == 0


async def test_memory_returns_after_a_burst_of_distinct_keys() -> None:
    from keybatch._model import Batch, KeyState

    def alive() -> int:
        kinds = (keybatch.Pending, Batch, KeyState)
        return sum(isinstance(o, kinds) for o in gc.get_objects())

    gc.collect()
    gc.disable()  # what is left must be freed by refcounting alone
    try:
        async with keybatch.open_processor(workers=2, min_duration=0.1) as processor:
            await processor.run("warm", lambda r: None)
            tracemalloc.start()
            baseline = tracemalloc.get_traced_memory()[0]
            pendings = [
                processor.submit(f"k{i}", lambda r: None) for i in range(10_000)
            ]
            for p in pendings:
                await p.result()
            del pendings, p
            left = tracemalloc.get_traced_memory()[0] - baseline
            tracemalloc.stop()
            # nothing outlives its batch but the key state each worker's loop
            # still names in a local variable until its next iteration
            assert alive() <= 2
    finally:
        gc.enable()
    # 10,000 keys pending at once take megabytes (before the fixes: 17 MB of
    # cycles and dict tables). What stays is CPython's free lists.
    assert left < 400_000, left
