"""The processor end to end, on trio in virtual time.

The first part ports every case of the Go original's test suite (elgopher/batch:
Run, Stop, metrics, routing); the rest checks the ten semantics points of the
core issue one by one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

import keybatch

pytestmark = pytest.mark.trio


class Account:
    def __init__(self, balance: int = 0) -> None:
        self.balance = balance

    def deposit(self, amount: int) -> int:
        self.balance += amount
        return self.balance


class Store:
    """In-memory store counting loads and saves, with optional delays."""

    def __init__(self, load_delay: float = 0.0, save_delay: float = 0.0) -> None:
        self.data: dict[Any, int] = {}
        self.loads: list[tuple[float, Any]] = []
        self.saves: list[tuple[float, Any, int]] = []
        self.load_delay = load_delay
        self.save_delay = save_delay

    async def load(self, key: Any) -> Account:
        self.loads.append((trio.current_time(), key))
        if self.load_delay:
            await trio.sleep(self.load_delay)
        return Account(self.data.get(key, 0))

    async def save(self, key: Any, account: Account) -> None:
        if self.save_delay:
            await trio.sleep(self.save_delay)
        self.saves.append((trio.current_time(), key, account.balance))
        self.data[key] = account.balance


async def outcome_of(fn: Callable[[], Any]) -> Any:
    try:
        return await fn()
    except BaseException as exc:
        return exc


# ---------------------------------------------------------------------------
# The Go original's Run cases
# ---------------------------------------------------------------------------


async def test_zero_resource_without_load(autojump_clock: trio.abc.Clock) -> None:
    seen = []
    async with keybatch.open_processor() as processor:
        await processor.run("key", lambda r: seen.append(r))
    assert seen == [None]


async def test_op_gets_loaded_resource_and_load_gets_key(
    autojump_clock: trio.abc.Clock,
) -> None:
    keys = []
    resource = object()

    async def load(key: str) -> object:
        keys.append(key)
        return resource

    async with keybatch.open_processor(load=load) as processor:
        got = await processor.run("key", lambda r: r)
    assert got is resource
    assert keys == ["key"]


async def test_modified_resource_is_saved(autojump_clock: trio.abc.Clock) -> None:
    store = Store()
    async with keybatch.open_processor(load=store.load, save=store.save) as processor:
        assert await processor.run("a", Account.deposit, 5) == 5
        assert await processor.run("a", Account.deposit, 7) == 12
    assert store.data == {"a": 12}


async def test_batch_lasts_min_duration(autojump_clock: trio.abc.Clock) -> None:
    store = Store()
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=0.5
    ) as processor:
        start = trio.current_time()
        await processor.run("a", Account.deposit, 1)
        assert trio.current_time() - start == pytest.approx(0.5)


async def test_default_min_duration_is_100ms(autojump_clock: trio.abc.Clock) -> None:
    async with keybatch.open_processor() as processor:
        start = trio.current_time()
        await processor.run("a", lambda r: None)
        assert trio.current_time() - start == pytest.approx(0.1)


async def test_long_operation_ends_batch_late_and_save_misses_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A slow operation delays the close; the save deadline is still start+max."""
    saves = []

    async def save(key: str, resource: None) -> None:
        await trio.lowlevel.checkpoint()
        saves.append(key)

    def slow(resource: None) -> str:
        autojump_clock.jump(5.0)  # the operation runs for 5 virtual seconds
        return "done"

    async with keybatch.open_processor(
        save=save, min_duration=0.1, max_duration=1.0
    ) as processor:
        start = trio.current_time()
        with pytest.raises(keybatch.SaveError) as info:
            await processor.run("a", slow)
        assert isinstance(info.value.__cause__, TimeoutError)
        assert trio.current_time() - start == pytest.approx(5.1)
    assert saves == []


async def test_long_operation_without_save_returns_when_done(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def slow(resource: None) -> str:
        autojump_clock.jump(5.0)
        return "done"

    async with keybatch.open_processor(min_duration=0.1) as processor:
        start = trio.current_time()
        assert await processor.run("a", slow) == "done"
        assert trio.current_time() - start == pytest.approx(5.1)


async def test_load_error_reaches_every_caller_once_loaded_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    calls = 0
    cause = ValueError("db down")

    async def load(key: str) -> None:
        nonlocal calls
        calls += 1
        raise cause

    results: list[BaseException] = []
    async with keybatch.open_processor(load=load) as processor:
        await trio.testing.wait_all_tasks_blocked()  # workers asleep
        async with trio.open_nursery() as nursery:
            for _ in range(5):

                async def call() -> None:
                    results.append(await outcome_of(lambda: processor.run("k", id)))

                nursery.start_soon(call)
    assert calls == 1
    assert len(results) == 5
    assert all(type(r) is keybatch.LoadError for r in results)
    assert len({id(r) for r in results}) == 5, "each caller has its own instance"
    assert all(r.__cause__ is cause and r.key == "k" for r in results)
    assert processor.statistics().load_failures == 1


async def test_load_timeout(autojump_clock: trio.abc.Clock) -> None:
    store = Store(load_delay=10)
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=0.1, max_duration=0.3
    ) as processor:
        start = trio.current_time()
        with pytest.raises(keybatch.LoadError) as info:
            await processor.run("k", Account.deposit, 1)
        assert isinstance(info.value.__cause__, TimeoutError)
        assert trio.current_time() - start == pytest.approx(0.3)
    assert store.saves == []


async def test_save_timeout(autojump_clock: trio.abc.Clock) -> None:
    store = Store(save_delay=10)
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=0.1, max_duration=0.3
    ) as processor:
        start = trio.current_time()
        with pytest.raises(keybatch.SaveError) as info:
            await processor.run("k", Account.deposit, 1)
        assert isinstance(info.value.__cause__, TimeoutError)
        assert trio.current_time() - start == pytest.approx(0.3)
    assert store.data == {}
    assert processor.statistics().save_failures == 1


async def test_1000_concurrent_operations_on_one_key_are_serialized(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = Store()
    results: list[int] = []
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=0.01
    ) as processor:

        async def call() -> None:
            results.append(await processor.run("k", Account.deposit, 1))

        async with trio.open_nursery() as nursery:
            for _ in range(1000):
                nursery.start_soon(call)
    assert store.data == {"k": 1000}
    assert sorted(results) == list(range(1, 1001)), "each op saw the ones before it"


async def test_cancelled_waiting_operation_is_never_applied(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = Store()
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=1.0
    ) as processor:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(processor.run, "k", Account.deposit, 100)
            with trio.move_on_after(0.5):
                await processor.run("k", Account.deposit, 1)
        assert processor.statistics().operations_withdrawn == 1
    assert store.data == {"k": 100}


# ---------------------------------------------------------------------------
# The Go original's Stop cases
# ---------------------------------------------------------------------------


async def test_run_after_stop_raises_processor_stopped(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with keybatch.open_processor() as processor:
        pass
    with pytest.raises(keybatch.ProcessorStopped):
        await processor.run("k", lambda r: None)
    with pytest.raises(keybatch.ProcessorStopped):
        processor.submit("k", lambda r: None)


async def test_stop_ends_running_batch_early(autojump_clock: trio.abc.Clock) -> None:
    store = Store()
    done_at = []
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=100
    ) as processor:

        async def call() -> None:
            await processor.run("k", Account.deposit, 1)
            done_at.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await trio.sleep(1)
            await processor.aclose()
    assert done_at == [pytest.approx(1.0)]
    assert store.data == {"k": 1}


async def test_stop_waits_for_save_in_progress(autojump_clock: trio.abc.Clock) -> None:
    store = Store(save_delay=2)
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=0.5, max_duration=5
    ) as processor:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(processor.run, "k", Account.deposit, 1)
            await trio.sleep(1)  # the batch closed at 0.5 and saves until 2.5
            await processor.aclose()
            assert trio.current_time() == pytest.approx(2.5)
    assert store.data == {"k": 1}


# ---------------------------------------------------------------------------
# The Go original's metrics cases: batch reports
# ---------------------------------------------------------------------------


async def test_report_carries_key_count_and_durations(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = Store(load_delay=0.05, save_delay=0.02)
    reports: list[keybatch.BatchReport] = []
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=0.2, on_batch=reports.append
    ) as processor:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(processor.run, "k", Account.deposit, 1)
    [report] = reports
    assert report.key == "k"
    assert report.worker == keybatch.worker_for_key("k", processor.statistics().workers)
    assert report.start == pytest.approx(0.0)
    assert report.operations == 3
    assert report.load_duration == pytest.approx(0.05)
    assert report.save_duration == pytest.approx(0.02)
    assert report.error is None


async def test_report_carries_load_error(autojump_clock: trio.abc.Clock) -> None:
    cause = OSError("no")

    async def load(key: str) -> None:
        raise cause

    reports: list[keybatch.BatchReport] = []
    async with keybatch.open_processor(load=load, on_batch=reports.append) as p:
        with pytest.raises(keybatch.LoadError):
            await p.run("k", lambda r: None)
    [report] = reports
    assert isinstance(report.error, keybatch.LoadError)
    assert report.error.__cause__ is cause
    assert report.save_duration is None
    assert report.operations == 1


async def test_report_carries_save_error(autojump_clock: trio.abc.Clock) -> None:
    cause = OSError("disk full")

    async def save(key: str, resource: None) -> None:
        raise cause

    reports: list[keybatch.BatchReport] = []
    async with keybatch.open_processor(save=save, on_batch=reports.append) as p:
        with pytest.raises(keybatch.SaveError) as info:
            await p.run("k", lambda r: None)
    [report] = reports
    assert isinstance(report.error, keybatch.SaveError)
    assert report.error.__cause__ is cause
    assert report.error is not info.value, "the report has its own instance"


async def test_many_reporting_batches_on_distinct_keys(
    autojump_clock: trio.abc.Clock,
) -> None:
    reports: list[keybatch.BatchReport] = []
    async with keybatch.open_processor(
        min_duration=0.1, workers=4, on_batch=reports.append
    ) as processor:
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(processor.run, f"key{i}", lambda r: None)
    assert sorted(r.key for r in reports) == sorted(f"key{i}" for i in range(200))
    assert all(r.operations == 1 for r in reports)
    assert {r.worker for r in reports} == {0, 1, 2, 3}
    for r in reports:
        assert r.worker == keybatch.worker_for_key(r.key, 4)


async def test_raising_hook_is_logged_and_ignored(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    def hook(report: keybatch.BatchReport) -> None:
        raise RuntimeError("hook bug")

    async with keybatch.open_processor(on_batch=hook) as processor:
        assert await processor.run("k", lambda r: 1) == 1
        assert await processor.run("k", lambda r: 2) == 2
    assert "on_batch hook raised" in caplog.text


# ---------------------------------------------------------------------------
# Semantics 1: routing and never-overlapping batches of a key
# ---------------------------------------------------------------------------


async def test_key_goes_to_worker_for_key(autojump_clock: trio.abc.Clock) -> None:
    reports: list[keybatch.BatchReport] = []
    async with keybatch.open_processor(
        workers=7, min_duration=0, on_batch=reports.append
    ) as processor:
        for key in ["a", "b", b"c", "ключ", ""]:
            await processor.run(key, lambda r: None)
    assert [r.worker for r in reports] == [
        keybatch.worker_for_key(k, 7) for k in ["a", "b", b"c", "ключ", ""]
    ]


async def test_batches_of_one_key_never_overlap(autojump_clock: trio.abc.Clock) -> None:
    events: list[tuple[str, float]] = []

    async def load(key: str) -> None:
        events.append(("load", trio.current_time()))
        await trio.sleep(0.1)

    async def save(key: str, resource: None) -> None:
        events.append(("save", trio.current_time()))
        await trio.sleep(0.3)
        events.append(("saved", trio.current_time()))

    async with keybatch.open_processor(
        load=load, save=save, min_duration=0.2, max_duration=10
    ) as processor:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(processor.run, "k", lambda r: None)
            await trio.sleep(0.3)  # the first batch is saving (0.2 .. 0.5)
            nursery.start_soon(processor.run, "k", lambda r: None)
    assert events == [
        ("load", 0.0),
        ("save", pytest.approx(0.2)),
        ("saved", pytest.approx(0.5)),
        ("load", pytest.approx(0.5)),  # the next batch starts after the save
        ("save", pytest.approx(0.7)),
        ("saved", pytest.approx(1.0)),
    ]


async def test_windows_of_keys_on_one_worker_overlap(
    autojump_clock: trio.abc.Clock,
) -> None:
    done: dict[str, float] = {}
    async with keybatch.open_processor(workers=1, min_duration=1.0) as processor:

        async def call(key: str) -> None:
            await processor.run(key, lambda r: None)
            done[key] = trio.current_time()

        async with trio.open_nursery() as nursery:
            for key in ["a", "b", "c"]:
                nursery.start_soon(call, key)
    assert done == {"a": 1.0, "b": 1.0, "c": 1.0}


async def test_at_most_workers_loads_and_saves_in_flight(
    autojump_clock: trio.abc.Clock,
) -> None:
    in_flight = peak = 0

    async def io() -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await trio.sleep(0.01)
        in_flight -= 1

    async def load(key: str) -> None:
        await io()

    async def save(key: str, resource: None) -> None:
        await io()

    async with keybatch.open_processor(
        load=load, save=save, workers=3, min_duration=0, max_duration=None
    ) as processor:
        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(processor.run, f"k{i}", lambda r: None)
    assert peak == 3


async def test_custom_router_allows_any_hashable_key(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with keybatch.open_processor(
        worker_for_key=lambda key, n: key[0] % n, workers=2, min_duration=0
    ) as processor:
        assert await processor.run((3, "x"), lambda r: "ok") == "ok"


async def test_router_returning_out_of_range_is_an_error_at_the_call(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with keybatch.open_processor(
        worker_for_key=lambda key, n: n, workers=2
    ) as processor:
        with pytest.raises(ValueError, match="worker_for_key returned 2"):
            await processor.run("k", lambda r: None)


# ---------------------------------------------------------------------------
# Semantics 2: windows, order, max_ops
# ---------------------------------------------------------------------------


async def test_operations_arriving_during_window_join_the_batch(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = Store()
    reports: list[keybatch.BatchReport] = []
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=1.0, on_batch=reports.append
    ) as processor:
        async with trio.open_nursery() as nursery:
            for delay in [0.0, 0.3, 0.99]:

                async def call(delay: float = delay) -> None:
                    await trio.sleep(delay)
                    await processor.run("k", Account.deposit, 1)
                    assert trio.current_time() == pytest.approx(1.0)

                nursery.start_soon(call)
    assert [r.operations for r in reports] == [3]
    assert len(store.loads) == 1


async def test_operation_after_close_goes_to_next_batch(
    autojump_clock: trio.abc.Clock,
) -> None:
    reports: list[keybatch.BatchReport] = []
    async with keybatch.open_processor(
        min_duration=1.0, on_batch=reports.append
    ) as processor:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(processor.run, "k", lambda r: None)
            await trio.sleep(1.5)
            nursery.start_soon(processor.run, "k", lambda r: None)
    assert [(r.start, r.operations) for r in reports] == [(0.0, 1), (1.5, 1)]


async def test_call_order_is_kept_across_batch_boundaries(
    autojump_clock: trio.abc.Clock,
) -> None:
    applied: list[int] = []
    async with keybatch.open_processor(min_duration=0.1, max_ops=3) as processor:
        pendings = [
            processor.submit("k", lambda r, i=i: applied.append(i)) for i in range(10)
        ]
        for p in pendings:
            await p.result()
    assert applied == list(range(10))


async def test_max_ops_closes_batch_early_with_exact_sizes(
    autojump_clock: trio.abc.Clock,
) -> None:
    reports: list[keybatch.BatchReport] = []
    async with keybatch.open_processor(
        min_duration=10, max_ops=4, on_batch=reports.append
    ) as processor:
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(processor.run, "k", lambda r: None)
    # two full batches close at once; the last two wait for their window
    assert [(r.start, r.operations) for r in reports] == [
        (0.0, 4),
        (0.0, 4),
        (0.0, 2),
    ]
    assert trio.current_time() == pytest.approx(10.0)


async def test_max_ops_reached_while_window_open_closes_now(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with keybatch.open_processor(min_duration=10, max_ops=2) as processor:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(processor.run, "k", lambda r: None)
            await trio.sleep(3)
            await processor.run("k", lambda r: None)
            assert trio.current_time() == pytest.approx(3.0)


async def test_min_duration_zero_closes_as_soon_as_applied(
    autojump_clock: trio.abc.Clock,
) -> None:
    reports: list[keybatch.BatchReport] = []
    async with keybatch.open_processor(
        min_duration=0, on_batch=reports.append
    ) as processor:
        await trio.testing.wait_all_tasks_blocked()  # workers asleep
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(processor.run, "k", lambda r: None)
        assert trio.current_time() == 0.0
    assert sum(r.operations for r in reports) == 5
    assert reports[0].operations == 5, "what piled up before the worker ran"


async def test_min_duration_zero_has_no_deadline_by_default(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = Store(load_delay=1000, save_delay=1000)
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=0
    ) as processor:
        assert await processor.run("k", Account.deposit, 1) == 1
        assert trio.current_time() == pytest.approx(2000)


async def test_load_time_eats_into_the_window(autojump_clock: trio.abc.Clock) -> None:
    store = Store(load_delay=0.3)
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=0.5, max_duration=1
    ) as processor:
        await processor.run("k", Account.deposit, 1)
        assert trio.current_time() == pytest.approx(0.5)


# ---------------------------------------------------------------------------
# Semantics 4-5: failures
# ---------------------------------------------------------------------------


async def test_save_error_reaches_every_caller_as_its_own_instance(
    autojump_clock: trio.abc.Clock,
) -> None:
    cause = OSError("disk full")

    async def save(key: str, resource: Account) -> None:
        raise cause

    async def load(key: str) -> Account:
        return Account()

    results: list[BaseException] = []
    async with keybatch.open_processor(load=load, save=save) as processor:
        async with trio.open_nursery() as nursery:
            for _ in range(4):

                async def call() -> None:
                    results.append(
                        await outcome_of(lambda: processor.run("k", Account.deposit, 1))
                    )

                nursery.start_soon(call)
    assert [type(r) for r in results] == [keybatch.SaveError] * 4
    assert len({id(r) for r in results}) == 4
    assert all(r.__cause__ is cause for r in results)


async def test_raising_operation_affects_only_its_caller(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = Store()

    def bad(account: Account) -> None:
        raise ZeroDivisionError("bug in op")

    async with keybatch.open_processor(load=store.load, save=store.save) as processor:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(processor.run, "k", Account.deposit, 1)
            with pytest.raises(ZeroDivisionError, match="bug in op"):
                await processor.run("k", bad)
            nursery.start_soon(processor.run, "k", Account.deposit, 2)
        assert processor.statistics().operation_failures == 1
    assert store.data == {"k": 3}


async def test_batch_where_every_op_raised_is_not_saved(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = Store()

    def bad(account: Account) -> None:
        raise KeyError("x")

    reports: list[keybatch.BatchReport] = []
    async with keybatch.open_processor(
        load=store.load, save=store.save, on_batch=reports.append
    ) as processor:
        with pytest.raises(KeyError):
            await processor.run("k", bad)
    assert store.saves == []
    assert reports[0].save_duration is None


async def test_load_error_does_not_poison_the_next_batch(
    autojump_clock: trio.abc.Clock,
) -> None:
    attempts = 0

    async def load(key: str) -> Account:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise OSError("flaky")
        return Account(10)

    async with keybatch.open_processor(load=load) as processor:
        with pytest.raises(keybatch.LoadError):
            await processor.run("k", Account.deposit, 1)
        assert await processor.run("k", Account.deposit, 1) == 11


# ---------------------------------------------------------------------------
# Semantics 6: cancellation
# ---------------------------------------------------------------------------


async def test_cancel_after_applied_keeps_the_effect(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = Store(save_delay=1.0)
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=0.5, max_duration=5
    ) as processor:
        with trio.move_on_after(0.7) as scope:  # applied at 0.5, saving until 1.5
            await processor.run("k", Account.deposit, 1)
        assert scope.cancelled_caught
        assert trio.current_time() == pytest.approx(0.7)
    assert store.data == {"k": 1}
    assert trio.current_time() == pytest.approx(1.5)


async def test_cancelled_caller_does_not_disturb_others(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = Store()
    results: list[int] = []
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=1.0
    ) as processor:
        async with trio.open_nursery() as nursery:

            async def call(n: int) -> None:
                results.append(await processor.run("k", Account.deposit, n))

            nursery.start_soon(call, 1)
            with trio.move_on_after(0.1):
                await processor.run("k", Account.deposit, 100)
            nursery.start_soon(call, 10)
    assert sorted(results) == [1, 11]
    assert store.data == {"k": 11}


async def test_key_whose_callers_all_withdrew_is_released_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = Store()
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=10
    ) as processor:
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(processor.run, "k", Account.deposit, 1)
            await trio.testing.wait_all_tasks_blocked()
            assert len(store.loads) == 1  # the window is open
            nursery.cancel_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        stats = processor.statistics()
        assert (stats.keys, stats.pending_operations, stats.active_batches) == (0, 0, 0)
        assert trio.current_time() == 0.0, "released without waiting for the window"
    assert store.saves == []


async def test_call_in_cancelled_scope_is_never_applied(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = Store()
    async with keybatch.open_processor(load=store.load, save=store.save) as processor:
        with trio.CancelScope() as scope:
            scope.cancel()
            await processor.run("k", Account.deposit, 1)
        await trio.testing.wait_all_tasks_blocked()
        stats = processor.statistics()
        assert (stats.keys, stats.pending_operations) == (0, 0)
        assert stats.operations_withdrawn == 1
    assert store.saves == []


# ---------------------------------------------------------------------------
# Semantics 7: stop
# ---------------------------------------------------------------------------


async def test_stop_saves_operations_queued_behind_a_saving_batch(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = Store(save_delay=1.0)
    results: list[int] = []
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=0.1, max_duration=5
    ) as processor:

        async def call(n: int) -> None:
            results.append(await processor.run("k", Account.deposit, n))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, 1)
            await trio.sleep(0.5)  # first batch saving until 1.1
            nursery.start_soon(call, 2)
            await trio.testing.wait_all_tasks_blocked()
            await processor.aclose()
            stopped_at = trio.current_time()
            assert store.data == {"k": 3}, "saved before aclose returned"
            assert processor.statistics().keys == 0
    assert stopped_at == pytest.approx(2.1)
    assert sorted(results) == [1, 3]


async def test_aclose_is_idempotent_and_leaves_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with keybatch.open_processor(workers=3) as processor:
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(processor.run, f"k{i}", lambda r: None)
            await trio.testing.wait_all_tasks_blocked()
            await processor.aclose()
            await processor.aclose()
        stats = processor.statistics()
        assert stats.stopping
        assert stats.keys == stats.pending_operations == stats.active_batches == 0
        assert stats.operations_done == 10
    await processor.aclose()
    assert _live_task_names("keybatch worker") == []


def _live_task_names(prefix: str) -> list[str]:
    names = []
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        names.append(task.name)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return [n for n in names if n.startswith(prefix)]


async def test_workers_are_tasks_while_open(autojump_clock: trio.abc.Clock) -> None:
    async with keybatch.open_processor(workers=3):
        assert len(_live_task_names("keybatch worker")) == 3
    assert _live_task_names("keybatch worker") == []


async def test_outer_cancellation_fails_unapplied_and_finishes_saves(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = Store(save_delay=1.0)
    results: list[Any] = []

    async def call(processor: keybatch.Processor[Account], n: int) -> None:
        results.append(await outcome_of(lambda: processor.run("k", Account.deposit, n)))

    async with trio.open_nursery() as callers:
        with trio.move_on_after(0.5):
            async with keybatch.open_processor(
                load=store.load, save=store.save, min_duration=0.2, max_duration=5
            ) as processor:
                callers.start_soon(call, processor, 1)  # applied at 0.2, saving
                await trio.sleep(0.3)
                callers.start_soon(call, processor, 2)  # queued behind the save
                await trio.sleep_forever()
        # the shielded save finished before the processor's block exited
        assert trio.current_time() == pytest.approx(1.2)
    assert store.data == {"k": 1}
    assert 1 in results
    [stopped] = [r for r in results if isinstance(r, BaseException)]
    assert isinstance(stopped, keybatch.ProcessorStopped)


async def test_block_raising_still_finishes_the_save(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = Store(save_delay=1.0)
    with pytest.raises(RuntimeError, match="boom"):
        async with keybatch.open_processor(
            load=store.load, save=store.save, min_duration=0.1, max_duration=5
        ) as processor:
            saved = processor.submit("k", Account.deposit, 1)
            await trio.sleep(0.5)  # applied at 0.1, saving until 1.1
            lost = processor.submit("k", Account.deposit, 10)
            raise RuntimeError("boom")
    assert trio.current_time() == pytest.approx(1.1)
    assert store.data == {"k": 1}
    assert await saved.result() == 1
    with pytest.raises(keybatch.ProcessorStopped):
        await lost.result()


# ---------------------------------------------------------------------------
# Semantics 8: backpressure
# ---------------------------------------------------------------------------


async def test_submit_raises_overloaded_at_max_pending(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with keybatch.open_processor(max_pending=2) as processor:
        processor.submit("a", lambda r: None)
        processor.submit("b", lambda r: None)
        with pytest.raises(keybatch.Overloaded):
            processor.submit("c", lambda r: None)
        await processor.flush()
        processor.submit("c", lambda r: None)


async def test_run_waits_for_room_at_max_pending(
    autojump_clock: trio.abc.Clock,
) -> None:
    started: list[float] = []
    async with keybatch.open_processor(max_pending=2, min_duration=1) as processor:

        async def call(key: str) -> None:
            await processor.run(key, lambda r: started.append(trio.current_time()))

        async with trio.open_nursery() as nursery:
            for key in "abc":
                nursery.start_soon(call, key)
            await trio.testing.wait_all_tasks_blocked()
            assert processor.statistics().pending_operations == 2
    # c waited for room until a and b finished at 1.0, then its own window
    assert started == [1.0, 1.0, 2.0]


async def test_cancelled_wait_for_room_enqueues_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    applied: list[str] = []
    async with keybatch.open_processor(max_pending=1, min_duration=1) as processor:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(processor.run, "a", lambda r: applied.append("a"))
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(0.5):
                await processor.run("b", lambda r: applied.append("b"))
        await processor.run("c", lambda r: applied.append("c"))
    assert applied == ["a", "c"]


async def test_room_waiters_get_processor_stopped_at_stop(
    autojump_clock: trio.abc.Clock,
) -> None:
    outcome: list[Any] = []
    async with keybatch.open_processor(max_pending=1, min_duration=1) as processor:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(processor.run, "a", lambda r: None)
            await trio.testing.wait_all_tasks_blocked()

            async def waiter() -> None:
                outcome.append(await outcome_of(lambda: processor.run("b", id)))

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            await processor.aclose()
    assert isinstance(outcome[0], keybatch.ProcessorStopped)


# ---------------------------------------------------------------------------
# Semantics 9: nothing leaks
# ---------------------------------------------------------------------------


async def test_keys_without_pending_work_hold_no_state(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with keybatch.open_processor(min_duration=0, workers=4) as processor:
        for chunk in range(20):
            async with trio.open_nursery() as nursery:
                for i in range(500):
                    nursery.start_soon(processor.run, f"{chunk}:{i}", lambda r: None)
            stats = processor.statistics()
            assert stats.keys == stats.pending_operations == stats.active_batches == 0
        assert all(not w.keys and not w.ready for w in processor._workers)
        assert processor.statistics().operations_done == 10_000


# ---------------------------------------------------------------------------
# submit / Pending / flush / statistics
# ---------------------------------------------------------------------------


async def test_submit_then_result(autojump_clock: trio.abc.Clock) -> None:
    store = Store()
    async with keybatch.open_processor(load=store.load, save=store.save) as processor:
        pending = processor.submit("k", Account.deposit, 5)
        assert not pending.done()
        assert await pending.result() == 5
        assert pending.done()
        assert trio.current_time() == pytest.approx(0.1)
        # awaiting again gives the same value and is still a checkpoint
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await pending.result()


async def test_submitted_work_is_saved_without_anyone_waiting(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = Store()
    async with keybatch.open_processor(load=store.load, save=store.save) as processor:
        for _ in range(3):
            processor.submit("k", Account.deposit, 1)
    assert store.data == {"k": 3}


async def test_cancelled_result_wait_does_not_withdraw(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = Store()
    async with keybatch.open_processor(load=store.load, save=store.save) as processor:
        pending = processor.submit("k", Account.deposit, 1)
        with trio.move_on_after(0.01):
            await pending.result()
        assert await pending.result() == 1


async def test_flush_closes_open_batches_now(autojump_clock: trio.abc.Clock) -> None:
    store = Store(save_delay=0.5)
    async with keybatch.open_processor(
        load=store.load,
        save=store.save,
        min_duration=100,
        max_duration=1000,
        workers=2,
        worker_for_key=lambda key, n: "ab".index(key),
    ) as processor:
        a = processor.submit("a", Account.deposit, 1)
        await trio.sleep(1)
        b = processor.submit("b", Account.deposit, 2)  # not loaded yet
        await processor.flush()
        assert trio.current_time() == pytest.approx(1.5)  # two saves in parallel
        assert a.done()
        assert b.done()
        assert store.data == {"a": 1, "b": 2}


async def test_statistics_is_a_frozen_snapshot(autojump_clock: trio.abc.Clock) -> None:
    async with keybatch.open_processor(workers=2, min_duration=1) as processor:
        pending = processor.submit("k", lambda r: None)
        await trio.testing.wait_all_tasks_blocked()
        stats = processor.statistics()
        assert (stats.workers, stats.keys, stats.active_batches) == (2, 1, 1)
        assert stats.pending_operations == 1
        with pytest.raises(AttributeError):
            stats.keys = 5  # type: ignore[misc]
        await pending.result()
        after = processor.statistics()
        assert (after.operations_done, after.batches_done, after.keys) == (1, 1, 0)
        assert stats.pending_operations == 1, "the snapshot did not change"


# ---------------------------------------------------------------------------
# Options are checked when the processor opens
# ---------------------------------------------------------------------------


async def _sync_load(key: str) -> None:  # pragma: no cover - never called
    return None


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"min_duration": -1}, ValueError),
        ({"min_duration": math.nan}, ValueError),
        ({"min_duration": math.inf}, ValueError),
        ({"min_duration": 1, "max_duration": 0.5}, ValueError),
        ({"max_duration": -1, "min_duration": 0}, ValueError),
        ({"min_duration": "1"}, TypeError),
        ({"workers": 0}, ValueError),
        ({"workers": 1.5}, TypeError),
        ({"max_ops": 0}, ValueError),
        ({"max_pending": 0}, ValueError),
        ({"max_ops": True}, TypeError),
        ({"load": lambda key: None}, TypeError),
        ({"save": print}, TypeError),
        ({"load": "not callable"}, TypeError),
        ({"on_batch": _sync_load}, TypeError),
        ({"worker_for_key": 3}, TypeError),
    ],
)
async def test_invalid_options_raise_when_opening(
    options: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        keybatch.open_processor(**options)


async def test_max_duration_defaults_to_twice_min_duration(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = Store(load_delay=100)
    async with keybatch.open_processor(load=store.load, min_duration=0.25) as processor:
        with pytest.raises(keybatch.LoadError):
            await processor.run("k", lambda r: None)
        assert trio.current_time() == pytest.approx(0.5)


async def test_async_op_is_a_type_error_at_the_call(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def op(resource: None) -> None:  # pragma: no cover - never called
        pass

    async with keybatch.open_processor() as processor:
        with pytest.raises(TypeError, match="plain function"):
            await processor.run("k", op)
        with pytest.raises(TypeError, match="callable"):
            processor.submit("k", 42)  # type: ignore[arg-type]
        assert await processor.run("k", lambda r: "still works") == "still works"


async def test_wrong_key_type_is_a_type_error_at_the_call(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with keybatch.open_processor() as processor:
        with pytest.raises(TypeError, match="str or bytes"):
            await processor.run(42, lambda r: None)
        with pytest.raises(ValueError, match="UTF-8"):
            await processor.run("\ud800", lambda r: None)
        assert processor.statistics().pending_operations == 0


async def test_processor_has_no_public_constructor() -> None:
    with pytest.raises(TypeError, match="no public constructor"):
        keybatch.Processor()
    with pytest.raises(TypeError, match="no public constructor"):
        keybatch.Pending()


async def test_newcomer_to_a_batch_everyone_withdrew_from_keeps_the_window(
    autojump_clock: trio.abc.Clock,
) -> None:
    """All callers withdrew (close now), then one arrived before the worker ran."""
    later: list[keybatch.Pending[str]] = []
    async with keybatch.open_processor(min_duration=1.0) as processor:

        async def caller() -> None:
            try:
                await processor.run("k", lambda r: "first")
            except trio.Cancelled:
                later.append(processor.submit("k", lambda r: "second"))
                raise

        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()  # loaded, window open
            nursery.cancel_scope.cancel()
        assert await later[0].result() == "second"
        assert trio.current_time() == pytest.approx(1.0)
