"""Reports, statistics, logging and reprs added by core v2 (issue 8)."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import pytest

import keybatch

pytestmark = pytest.mark.anyio


def noop(resource: Any) -> None:
    return None


def boom(resource: Any) -> None:
    raise ValueError("op failed")


async def test_close_reasons_durations_and_counts_are_exact() -> None:
    reports: list[keybatch.BatchReport] = []

    async def load(key: Any) -> None:
        await anyio.sleep(0.01)
        if key == "bad":
            raise OSError("down")

    async def save(key: Any, resource: Any) -> None:
        await anyio.sleep(0.02)

    before = time.time()
    async with keybatch.open_processor(
        load=load, save=save, min_duration=0.1, max_ops=3, on_batch=reports.append
    ) as processor:
        # window: one op, one raising op, one withdrawn op
        withdrawn = anyio.CancelScope()

        async def doomed() -> None:
            with withdrawn:
                await processor.run("w", noop)

        async with anyio.create_task_group() as tg:
            tg.start_soon(doomed)
            await anyio.sleep(0.01)
            processor.submit("w", boom)
            await anyio.sleep(0.05)
            withdrawn.cancel()
        await anyio.sleep(0.2)
        for _ in range(3):
            processor.submit("m", noop)  # max_ops
        await anyio.sleep(0.2)
        flushed = processor.submit("f", noop)
        await processor.flush()
        assert flushed.done()
        with pytest.raises(keybatch.LoadError):
            await processor.run("bad", noop)
        processor.submit("s", noop)
    by_key = {r.key: r for r in reports}
    assert set(by_key) == {"w", "m", "f", "bad", "s"}
    w = by_key["w"]
    assert (w.close_reason, w.operations, w.failed_operations) == ("window", 1, 1)
    assert w.withdrawn_operations == 1
    assert w.start == 0.0
    assert w.duration == pytest.approx(0.1)  # window ends; nothing applied: no save
    assert w.save_duration is None
    assert w.load_duration == pytest.approx(0.01)
    m = by_key["m"]
    assert m.close_reason == "max_ops"
    assert m.duration == pytest.approx(0.01 + 0.02)
    assert m.save_duration == pytest.approx(0.02)
    assert by_key["f"].close_reason == "flush"
    assert by_key["bad"].close_reason is None
    assert isinstance(by_key["bad"].error, keybatch.LoadError)
    assert by_key["s"].close_reason == "stop"
    for report in reports:
        assert before <= report.wall_start <= time.time()
        assert report.replays == 0


async def test_max_worker_queue_counts_ops_not_yet_applied_on_the_busiest_worker() -> (
    None
):
    def route(key: Any, workers: int) -> int:
        return 0 if key.startswith("zero") else 1

    async with keybatch.open_processor(
        min_duration=0.1, workers=2, worker_for_key=route
    ) as processor:
        for i in range(5):
            processor.submit(f"zero{i % 2}", noop)
        for _ in range(2):
            processor.submit("one", noop)
        stats = processor.statistics()
        assert (stats.max_worker_queue, stats.pending_operations) == (5, 7)
        await processor.flush()
        assert processor.statistics().max_worker_queue == 0


async def test_debug_log_one_line_per_batch_and_warning_for_a_hook(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def hook(report: keybatch.BatchReport) -> None:
        raise RuntimeError("hook broke")

    with caplog.at_level(logging.DEBUG, logger="keybatch"):
        async with keybatch.open_processor(min_duration=0.1, on_batch=hook) as p:
            await p.run("k", noop)
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(debug) == 1
    assert "'k'" in debug[0].getMessage()
    assert "close=window" in debug[0].getMessage()
    assert len(warnings) == 1
    assert warnings[0].exc_info is not None


async def test_internal_objects_have_reprs_a_debugger_can_read() -> None:
    async with keybatch.open_processor(min_duration=0.1, workers=1) as processor:
        pending = processor.submit("k", noop)
        engine = processor._engine  # internal, for the debugger's view
        worker = engine.workers[0]
        [state] = worker.keys.values()
        assert "running" in repr(engine)
        assert repr(worker).startswith("<Worker 0 keys=1")
        assert "key='k'" in repr(state)
        assert "key='k' ops=1" in repr(pending._batch)
        assert "pending" in repr(pending)
        assert "Processor running" in repr(processor)
