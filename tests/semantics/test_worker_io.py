"""docs/semantics.md, point 14 (worker I/O): a worker awaits the loads and saves
of its keys itself, so at most `workers` are in flight; windows of different
keys on one worker overlap; a slow load or save delays every key sharing its
worker, and the delay counts against their deadlines."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

import keybatch

from ..helpers import Account, Store, append, now, settle

pytestmark = pytest.mark.anyio


async def test_windows_of_keys_on_one_worker_overlap() -> None:
    done: dict[str, float] = {}
    async with keybatch.open_processor(workers=1, min_duration=1.0) as processor:

        async def call(key: str, delay: float) -> None:
            await anyio.sleep(delay)
            await processor.run(key, lambda r: None)
            done[key] = now()

        async with anyio.create_task_group() as tg:
            for i, delay in enumerate([0.75, 0.125, 0.5, 0.0]):
                tg.start_soon(call, f"k{i}", delay)
    # each window closes one second after its own start, in that order
    assert done == {"k0": 1.75, "k1": 1.125, "k2": 1.5, "k3": 1.0}
    assert list(done) == ["k3", "k1", "k2", "k0"]


@pytest.mark.parametrize("workers", [1, 3])
async def test_at_most_workers_loads_and_saves_in_flight(workers: int) -> None:
    in_flight = peak = 0

    async def io() -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await anyio.sleep(0.01)
        in_flight -= 1

    async def load(key: str) -> None:
        await io()

    async def save(key: str, resource: None) -> None:
        await io()

    async with (
        keybatch.open_processor(
            load=load, save=save, workers=workers, min_duration=0, max_duration=None
        ) as processor,
        anyio.create_task_group() as tg,
    ):
        for i in range(100):
            tg.start_soon(processor.run, f"k{i}", lambda r: None)
    assert peak == workers


@pytest.mark.parametrize(
    ("max_duration", "expected"),
    [
        (
            0.5,
            {
                "slow": TimeoutError,  # its own deadline: 0.5
                "slow at": 0.5,
                # started at 0 but loads only once the worker is free: its
                # deadline (0.5) passed while it waited, so its load is cut
                # off at its first await
                "same": TimeoutError,
                "same at": 0.5,
                "apart": 1,  # another worker: not delayed
                "apart at": 0.25,
            },
        ),
        (
            5,
            {
                "slow": 1,
                "slow at": 0.8125,  # loaded past its window: closes at once
                # loaded from 0.8125 to 0.875; its window counts from its
                # start (0), not from its load: it closes right after the load
                "same": 1,
                "same at": 0.875,
                "apart": 1,
                "apart at": 0.25,
            },
        ),
    ],
    ids=["the delay counts against the deadline", "and against the window"],
)
async def test_a_slow_load_delays_the_keys_sharing_its_worker(
    max_duration: float, expected: dict[str, object]
) -> None:
    store = Store(load_delay=0.0625)

    async def load(key: str) -> Account:
        if key == "slow":
            await anyio.sleep(0.75)
        return await store.load(key)

    results: dict[str, object] = {}
    async with keybatch.open_processor(
        load=load,
        save=store.save,
        workers=2,
        worker_for_key=lambda key, n: 1 if key == "apart" else 0,
        min_duration=0.25,
        max_duration=max_duration,
    ) as processor:

        async def call(key: str) -> None:
            try:
                results[key] = await processor.run(key, Account.deposit, 1)
            except keybatch.LoadError as exc:
                results[key] = type(exc.__cause__)
            results[key + " at"] = now()

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "slow")
            await settle()  # the worker is in the slow load
            tg.start_soon(call, "same")
            tg.start_soon(call, "apart")
    assert results == expected


async def test_a_due_window_closes_while_new_keys_keep_arriving() -> None:
    """Timers are not starved by a ready queue that never empties."""

    async def load(key: str) -> None:
        await anyio.sleep(0.1)

    closed_at: list[float] = []
    async with keybatch.open_processor(
        load=load, workers=1, min_duration=1.0, max_duration=100
    ) as processor:
        window = processor.submit("window", lambda r: None)

        async def producer() -> None:
            for i in range(100):  # two new keys per load: the backlog only grows
                processor.submit(f"new{i}", lambda r: None)
                await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            tg.start_soon(producer)
            await window.result()
            closed_at.append(now())
    # the window became due at 1.0 and waited only for the keys queued before it
    assert closed_at[0] < 3.0


async def test_a_busy_worker_lets_other_tasks_run() -> None:
    seen: set[int] = set()
    async with keybatch.open_processor(workers=1, min_duration=0) as processor:
        await settle()
        pendings = [processor.submit(f"k{i}", lambda r: None) for i in range(1000)]

        async def probe() -> None:
            while processor.statistics().batches_done < 1000:
                seen.add(processor.statistics().batches_done)
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(probe)
        for p in pendings:
            await p.result()
    assert any(0 < n < 1000 for n in seen), "the worker yielded between batches"
    assert now() == 0.0


async def test_a_load_that_never_awaits_still_lets_batches_form() -> None:
    data: dict[str, list[object]] = {}

    async def eager_load(key: str) -> list[object]:
        return list(data.get(key, []))  # no await at all: never a checkpoint

    async def save(key: str, resource: list[object]) -> None:
        data[key] = list(resource)
        await anyio.lowlevel.checkpoint()

    async with keybatch.open_processor(
        load=eager_load, save=save, min_duration=0, workers=2
    ) as processor:
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(processor.submit(f"k{i % 20}", append, i).result)
        await processor.flush()
        assert now() == 0
    assert sum(len(v) for v in data.values()) == 200
    assert data["k3"] == list(range(3, 200, 20))
