"""docs/semantics.md, points 2 (one batch per key at a time) and 3 (batch
boundaries): a batch starts when an operation arrives for a key with no batch in
flight, or when the previous batch ends with operations queued; it loads once
and stays open until `start + min_duration`, or closes earlier at `max_ops`, on
`flush`, or at the stop; a load that ends after `start + min_duration` closes
it right after the load; later operations go to the next batch."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import keybatch

from ..helpers import Account, Harness, Store, append, kt, now, settle

pytestmark = pytest.mark.anyio


async def test_batches_of_one_key_never_overlap() -> None:
    events: list[tuple[str, float]] = []

    async def load(key: str) -> None:
        events.append(("load", now()))
        await anyio.sleep(0.125)

    async def save(key: str, resource: None) -> None:
        events.append(("save", now()))
        await anyio.sleep(0.375)
        events.append(("saved", now()))

    async with (
        keybatch.open_processor(
            load=load, save=save, min_duration=0.25, max_duration=10
        ) as processor,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(processor.run, "k", lambda r: None)
        await anyio.sleep(0.5)  # the first batch saves from 0.25 to 0.625
        tg.start_soon(processor.run, "k", lambda r: None)
    assert events == [
        ("load", 0.0),
        ("save", 0.25),
        ("saved", 0.625),
        ("load", 0.625),  # the next batch starts once the previous one saved
        ("save", 0.875),
        ("saved", 1.25),
    ]


@pytest.mark.parametrize(
    ("options", "returns_at"),
    [
        ({}, 0.1),  # the default min_duration
        ({"min_duration": 0.5}, 0.5),
        ({"min_duration": 0.5, "load_delay": 0.25, "max_duration": 1}, 0.5),
        ({"min_duration": 0.5, "load_delay": 0.75, "max_duration": 1}, 0.75),
        ({"min_duration": 0, "load_delay": 0.25, "save_delay": 0.5}, 0.75),
    ],
    ids=["default 0.1", "0.5", "load eats into window", "load past window", "0"],
)
async def test_a_lone_operation_returns_at_the_close_plus_the_save(
    options: dict[str, Any], returns_at: float
) -> None:
    """The window counts from the batch start, so load time eats into it; a load
    ending after `start + min_duration` closes the batch right after the load."""
    options = dict(options)  # the row is shared by every backend's run
    store = Store(options.pop("load_delay", 0), options.pop("save_delay", 0))
    reports: list[keybatch.BatchReport] = []
    async with store.open(**options, on_batch=reports.append) as processor:
        assert await processor.run("k", Account.deposit, 1) == 1
        assert now() == returns_at
    assert store.data == {"k": 1}
    [report] = reports
    assert (report.start, report.duration, report.close_reason) == (
        0.0,
        returns_at,
        "window",
    )


@pytest.mark.parametrize(
    ("arrivals", "min_duration"),
    [
        ([0.0, 0.25, 0.875, 0.999], 1.0),
        ([i * 0.0099 for i in range(10)], 0.1),
    ],
    ids=["four in a 1 s window", "ten in a 0.1 s window"],
)
async def test_operations_arriving_during_the_window_join_the_batch(
    arrivals: list[float], min_duration: float
) -> None:
    h = Harness()
    returned: list[float] = []

    async def call(i: int, at: float) -> None:
        await anyio.sleep(at)
        await h.call(processor, i, "k", append, i)
        returned.append(now())

    async with h.open(min_duration=min_duration) as processor:
        async with anyio.create_task_group() as tg:
            for i, at in enumerate(arrivals):
                tg.start_soon(call, i, at)
    n = len(arrivals)
    assert h.batches("k") == [n]
    assert (h.store.loads, h.store.saves) == (1, 1)
    assert h.store.data == {"k": list(range(n))}
    assert h.results == {i: i + 1 for i in range(n)}
    assert returned == [min_duration] * n
    await h.check()


@pytest.mark.parametrize(
    ("arrivals", "min_duration", "save_latency", "expected"),
    [
        ([0.0, 1.5], 1.0, 0.0, [(0.0, 1), (1.5, 1)]),
        # windows [1/64, 9/64), save until 12/64; [12/64, 20/64) takes the two
        # calls queued during the save, save until 23/64; then the last two.
        (
            [(2 * i + 1) / 64 for i in range(12)],
            8 / 64,
            3 / 64,
            [(1 / 64, 4), (12 / 64, 6), (23 / 64, 2)],
        ),
    ],
    ids=["after the window", "during the save"],
)
async def test_operations_arriving_after_the_close_go_to_the_next_batch(
    arrivals: list[float],
    min_duration: float,
    save_latency: float,
    expected: list[tuple[float, int]],
) -> None:
    h = Harness()
    if save_latency:
        h.store.inject("save", latency=save_latency)
    async with h.open(min_duration=min_duration) as processor:
        async with anyio.create_task_group() as tg:
            for i, at in enumerate(arrivals):
                await anyio.sleep(at - now())
                tg.start_soon(h.call, processor, i, "k", append, i)
    assert [(r.start, r.operations) for r in h.reports] == expected
    assert h.store.data == {"k": list(range(len(arrivals)))}
    await h.check()


@pytest.mark.parametrize(
    ("calls", "how", "sizes", "reasons", "ends_at"),
    [
        (10, "run", [4, 4, 2], ["max_ops", "max_ops", "window"], 10.0),
        (8, "submit", [4, 4], ["max_ops", "max_ops"], 0.0),
        # flush() marked every queued batch before the full ones closed: only
        # the last one's reason is pinned
        (10, "submit+flush", [4, 4, 2], None, 0.0),
    ],
)
async def test_max_ops_closes_batches_at_exactly_that_many_operations(
    calls: int, how: str, sizes: list[int], reasons: list[str] | None, ends_at: float
) -> None:
    h = Harness()
    async with h.open(min_duration=10, max_ops=4) as processor:
        if how == "run":
            async with anyio.create_task_group() as tg:
                for i in range(calls):
                    tg.start_soon(h.call, processor, i, "k", append, i)
        else:
            pendings = [h.rec.submit(processor, "k", append, i) for i in range(calls)]
            if how == "submit+flush":
                await processor.flush()
            for p in pendings:
                await h.rec.result(p)
        assert now() == ends_at
    assert h.batches("k") == sizes
    if reasons is None:
        assert h.reports[-1].close_reason == "flush"
    else:
        assert [r.close_reason for r in h.reports] == reasons
    assert [r.start for r in h.reports] == [0.0] * len(sizes)
    await h.check()


async def test_max_ops_reached_while_the_window_is_open_closes_it_now() -> None:
    reports: list[keybatch.BatchReport] = []
    async with keybatch.open_processor(
        min_duration=10, max_ops=2, on_batch=reports.append
    ) as processor:
        async with anyio.create_task_group() as tg:
            tg.start_soon(processor.run, "k", lambda r: None)
            await anyio.sleep(3)
            await processor.run("k", lambda r: None)
            assert now() == 3.0
    assert [(r.operations, r.close_reason) for r in reports] == [(2, "max_ops")]


async def test_the_full_batch_timer_does_not_close_the_next_batch_early() -> None:
    reports: list[keybatch.BatchReport] = []
    closed_at: list[float] = []
    async with keybatch.open_processor(
        min_duration=1.0, max_ops=2, on_batch=reports.append
    ) as processor:
        first = processor.submit("k", lambda r: None)
        await anyio.sleep(0.5)
        second = processor.submit("k", lambda r: None)  # full: closes at 0.5
        third = processor.submit("k", lambda r: None)  # next batch: starts 0.5
        for p in (first, second, third):
            await p.result()
            closed_at.append(now())
    # the first batch's timer (1.0) is stale; the next closes at 0.5 + 1.0
    assert closed_at == [0.5, 0.5, 1.5]
    assert [(r.start, r.operations) for r in reports] == [(0.0, 2), (0.5, 1)]


async def test_min_duration_zero_closes_as_soon_as_loaded() -> None:
    reports: list[keybatch.BatchReport] = []
    async with keybatch.open_processor(
        min_duration=0, on_batch=reports.append
    ) as processor:
        await settle()  # the workers sleep
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(processor.run, "k", lambda r: None)
        assert now() == 0.0
    assert sum(r.operations for r in reports) == 5
    assert reports[0].operations == 5, "what piled up before the worker ran"


async def test_flush_closes_open_and_unloaded_batches_now() -> None:
    store = Store(save_delay=0.5)
    reports: list[keybatch.BatchReport] = []
    async with store.open(
        min_duration=100,
        max_duration=1000,
        workers=2,
        worker_for_key=lambda key, n: "ab".index(key),
        on_batch=reports.append,
    ) as processor:
        a = processor.submit("a", Account.deposit, 1)
        await anyio.sleep(1)
        b = processor.submit("b", Account.deposit, 2)  # not loaded yet
        await processor.flush()
        assert now() == 1.5  # both saves ran at once, on two workers
        assert a.done()
        assert b.done()
        assert store.data == {"a": 1, "b": 2}
        after = processor.submit("a", Account.deposit, 1)  # keeps a normal window
        await after.result()
        assert now() == 1.5 + 100 + 0.5
    assert [r.close_reason for r in reports] == ["flush", "flush", "window"]


async def test_flush_waits_for_everything_accepted_before_it() -> None:
    h = Harness()
    async with h.open(min_duration=10) as processor:
        pendings = [h.rec.submit(processor, k, append, 1) for k in "abc"]
        with kt.assert_elapsed(0):
            await processor.flush()
        assert all(p.done() for p in pendings)
        assert processor.statistics().pending_operations == 0
    assert h.store.data == {k: [1] for k in "abc"}
    await h.check()


async def test_flush_waits_for_the_batch_behind_a_saving_one() -> None:
    store = Store(save_delay=0.5)
    async with store.open(min_duration=1, max_duration=10) as processor:
        first = processor.submit("k", Account.deposit, 1)
        await anyio.sleep(1.25)  # saving until 1.5
        second = processor.submit("k", Account.deposit, 2)
        await processor.flush()
        # the second batch starts at 1.5, closes as soon as loaded, saves 0.5
        assert now() == 2.0
        assert (await first.result(), await second.result()) == (1, 3)
