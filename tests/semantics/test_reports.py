"""docs/semantics.md, point 15 (reports): `on_batch` is called in the worker
after every batch with a frozen BatchReport; it is a plain callable; what it
raises is logged to the `keybatch` logger and ignored. And `statistics()`, the
processor's frozen snapshot."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import anyio
import pytest

import keybatch

from ..helpers import Account, Store, append, jump, list_store, now, opener, settle

pytestmark = pytest.mark.anyio


async def test_a_report_carries_key_worker_counts_and_durations() -> None:
    store = Store(load_delay=0.0625, save_delay=0.03125)
    reports: list[keybatch.BatchReport] = []
    before = time.time()
    async with store.open(min_duration=0.25, on_batch=reports.append) as processor:
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(processor.run, "k", Account.deposit, 1)
            await settle()
            with anyio.move_on_after(0.125):  # a fourth caller, withdrawn
                await processor.run("k", Account.deposit, 100)
            failing = processor.submit("k", lambda r: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            await failing.result()
    [report] = reports
    assert report.key == "k"
    assert report.worker == keybatch.worker_for_key("k", processor.statistics().workers)
    assert report.start == 0.0
    assert report.operations == 4
    assert report.failed_operations == 1
    assert report.withdrawn_operations == 1
    assert report.load_duration == 0.0625
    assert report.save_duration == 0.03125
    assert report.duration == 0.25 + 0.03125
    assert report.close_reason == "window"
    assert report.error is None
    assert report.replays == 0
    assert before <= report.wall_start <= time.time()
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.operations = 5  # type: ignore[misc]


@pytest.mark.parametrize("what", ["load", "save"])
async def test_a_report_carries_the_batch_error_as_its_own_instance(
    what: str,
) -> None:
    cause = OSError("no")

    async def load(key: str) -> None:
        if what == "load":
            raise cause

    async def save(key: str, resource: None) -> None:
        raise cause

    reports: list[keybatch.BatchReport] = []
    async with keybatch.open_processor(
        load=load, save=save, on_batch=reports.append
    ) as processor:
        error = keybatch.LoadError if what == "load" else keybatch.SaveError
        with pytest.raises(error) as info:
            await processor.run("k", lambda r: None)
    [report] = reports
    assert type(report.error) is error
    assert report.error is not info.value, "the report has its own instance"
    assert report.error.__cause__ is cause
    assert report.error.key == "k"
    assert report.operations == 1
    if what == "load":
        assert (report.save_duration, report.close_reason) == (None, None)
    else:
        assert report.save_duration == 0.0
        assert report.close_reason == "window"
        assert report.error.may_have_landed is True


@pytest.mark.parametrize("kind", [RuntimeError, ValueError, KeyError])
async def test_a_raising_hook_is_logged_and_ignored(
    kind: type[Exception], caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    def hook(report: keybatch.BatchReport) -> None:
        calls.append(report.key)
        raise kind("hook broke")

    store = list_store()
    with caplog.at_level(logging.WARNING, logger="keybatch"):
        async with opener(store, on_batch=hook) as processor:
            assert await processor.run("a", append, 1) == 1
            assert await processor.run("a", append, 2) == 2
            assert await processor.run("b", append, 3) == 1
    assert calls == ["a", "a", "b"]
    records = [r for r in caplog.records if r.name == "keybatch"]
    assert len(records) == 3
    assert all(r.levelno == logging.WARNING for r in records)
    assert "on_batch hook raised" in records[0].getMessage()
    assert records[0].exc_info is not None
    assert records[0].exc_info[0] is kind
    assert store.data == {"a": [1, 2], "b": [3]}


async def test_a_slow_hook_holds_its_worker_but_breaks_nothing() -> None:
    # A hook is plain code on the worker: a slow one holds that worker (here,
    # virtual time passes inside it). Results are still right and delivered.
    def slow(report: keybatch.BatchReport) -> None:
        jump(0.03125)

    store = list_store()
    async with opener(store, on_batch=slow, workers=1) as processor:
        async with anyio.create_task_group() as tg:
            for key in "abc":
                tg.start_soon(processor.run, key, append, 1)
        # the three windows ran together; three hooks ran one after the other
        assert now() == 0.1 + 3 * 0.03125
    assert store.data == {"a": [1], "b": [1], "c": [1]}


async def test_the_hook_runs_in_the_worker_after_the_outcomes_are_delivered() -> None:
    seen: list[Any] = []

    def hook(report: keybatch.BatchReport) -> None:
        seen.append((report.key, pending.done(), processor.statistics().batches_done))

    async with keybatch.open_processor(on_batch=hook) as processor:
        pending = processor.submit("k", lambda r: None)
        await pending.result()
    assert seen == [("k", True, 1)]


async def test_statistics_is_a_frozen_snapshot() -> None:
    async with keybatch.open_processor(workers=2, min_duration=1) as processor:
        pending = processor.submit("k", lambda r: None)
        await settle()
        stats = processor.statistics()
        assert (stats.workers, stats.keys, stats.active_batches) == (2, 1, 1)
        assert (stats.pending_operations, stats.max_worker_queue) == (1, 1)
        assert not stats.stopping
        with pytest.raises(dataclasses.FrozenInstanceError):
            stats.keys = 5  # type: ignore[misc]
        await pending.result()
        after = processor.statistics()
        assert (after.operations_done, after.batches_done, after.keys) == (1, 1, 0)
        assert stats.pending_operations == 1, "the snapshot did not change"
