"""The worker loop: stale timers, and a worker torn down by a BaseException."""

from __future__ import annotations

import sys

import pytest
import trio
import trio.testing

import keybatch

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

pytestmark = pytest.mark.trio


async def test_stale_timer_does_not_close_the_next_batch_early(
    autojump_clock: trio.abc.Clock,
) -> None:
    reports: list[keybatch.BatchReport] = []
    closed_at: list[float] = []
    async with keybatch.open_processor(
        min_duration=1.0, max_ops=2, on_batch=reports.append
    ) as processor:
        first = processor.submit("k", lambda r: None)
        await trio.sleep(0.5)
        second = processor.submit("k", lambda r: None)  # full: closes at 0.5
        third = processor.submit("k", lambda r: None)  # next batch: starts 0.5
        for p in (first, second, third):
            await p.result()
            closed_at.append(trio.current_time())
    # the first batch's timer (1.0) is stale; the next closes at 0.5 + 1.0
    assert closed_at == [0.5, 0.5, 1.5]
    assert [(r.start, r.operations) for r in reports] == [(0.0, 2), (0.5, 1)]


async def test_timers_of_many_keys_fire_in_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    done: dict[str, float] = {}
    async with keybatch.open_processor(workers=1, min_duration=1.0) as processor:

        async def call(key: str, delay: float) -> None:
            await trio.sleep(delay)
            await processor.run(key, lambda r: None)
            done[key] = trio.current_time()

        async with trio.open_nursery() as nursery:
            for i, delay in enumerate([0.7, 0.1, 0.4, 0.0]):
                nursery.start_soon(call, f"k{i}", delay)
    assert done == {"k0": 1.7, "k1": 1.1, "k2": 1.4, "k3": 1.0}


async def test_base_exception_from_save_tears_down_and_fails_the_rest(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def save(key: str, resource: None) -> None:
        if key == "fatal":
            raise SystemExit(3)

    outcomes: dict[str, BaseException] = {}

    async def call(processor: keybatch.Processor[None], key: str) -> None:
        try:
            await processor.run(key, lambda r: None)
        except BaseException as exc:
            outcomes[key] = exc

    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            async with keybatch.open_processor(
                save=save,
                workers=1,
                worker_for_key=lambda key, n: 0,
                min_duration=0.1,
            ) as processor:
                nursery.start_soon(call, processor, "fatal")
                await trio.sleep(0.05)
                nursery.start_soon(call, processor, "other")
                await trio.sleep_forever()
    assert info.group_contains(SystemExit)
    assert isinstance(outcomes["fatal"], keybatch.SaveError)
    assert isinstance(outcomes["fatal"].__cause__, SystemExit)
    assert isinstance(outcomes["other"], keybatch.ProcessorStopped)
    stats = processor.statistics()
    assert (stats.keys, stats.pending_operations, stats.active_batches) == (0, 0, 0)


async def test_due_window_closes_while_new_keys_keep_arriving(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Timers are not starved by a ready queue that never empties."""

    async def load(key: str) -> None:
        await trio.sleep(0.1)

    closed_at: list[float] = []
    async with keybatch.open_processor(
        load=load, workers=1, min_duration=1.0, max_duration=100
    ) as processor:
        window = processor.submit("window", lambda r: None)

        async def producer() -> None:
            for i in range(100):  # two new keys per load: the backlog only grows
                processor.submit(f"new{i}", lambda r: None)
                await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            await window.result()
            closed_at.append(trio.current_time())
    # the window became due at 1.0 and waited only for the keys queued before it
    assert closed_at[0] < 3.0


async def test_busy_worker_lets_other_tasks_run(autojump_clock: trio.abc.Clock) -> None:
    seen: set[int] = set()
    async with keybatch.open_processor(workers=1, min_duration=0) as processor:
        await trio.testing.wait_all_tasks_blocked()
        pendings = [processor.submit(f"k{i}", lambda r: None) for i in range(1000)]

        async def probe() -> None:
            while processor.statistics().batches_done < 1000:
                seen.add(processor.statistics().batches_done)
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe)
        for p in pendings:
            await p.result()
    assert any(0 < n < 1000 for n in seen), "the worker yielded between batches"


async def test_memory_returns_after_a_burst_of_distinct_keys(
    autojump_clock: trio.abc.Clock,
) -> None:
    import gc
    import tracemalloc

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
                processor.submit(f"k{i}", lambda r: None) for i in range(20_000)
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
    # 20,000 keys pending at once take megabytes (before the fixes: 35 MB of
    # cycles and dict tables). What stays is CPython's free lists (2,000 tuples).
    assert left < 400_000
