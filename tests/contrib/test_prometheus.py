"""keybatch.contrib.prometheus: scrape a fresh registry around real processors.

Tests marked ``needs_core_v2`` check values the core v2 fills in (close reasons,
durations, max_worker_queue, conflicts); they are skipped while the core does not
take ``max_replays``.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import anyio
import pytest

pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import keybatch
from keybatch.contrib.prometheus import BatchHistograms, StatisticsCollector

CORE_V2 = "max_replays" in inspect.signature(keybatch.open_processor).parameters
needs_core_v2 = pytest.mark.skipif(
    not CORE_V2, reason="needs the core v2 (BatchReport and statistics fields)"
)


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[Any, ...]], float]:
    """Parse the exposition text: {(sample name, sorted labels): value}."""
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(
    samples: dict[tuple[str, tuple[Any, ...]], float], name: str, **labels: str
) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


class Account:
    def __init__(self) -> None:
        self.balance = 0


def deposit(account: Account, amount: int) -> int:
    account.balance += amount
    return account.balance


def refuse(account: Account) -> None:
    raise ValueError("refused")


async def load(key: str) -> Account:
    await anyio.sleep(0.01)
    return Account()


async def save(key: str, account: Account) -> None:
    await anyio.sleep(0.02)


@pytest.mark.anyio
async def test_collector_scrapes_statistics() -> None:
    registry = CollectorRegistry()
    collector = StatisticsCollector(registry)
    async with keybatch.open_processor(
        load=load, save=save, min_duration=0.1, workers=3
    ) as processor:
        collector.observe(processor, "accounts")
        for i in range(4):
            processor.submit("a", deposit, i)
        processor.submit("b", refuse)
        await anyio.sleep(0.05)  # the window is open
        samples = scrape(registry)
        stats = processor.statistics()
        assert value(samples, "keybatch_workers", processor="accounts") == 3
        assert value(samples, "keybatch_pending_operations", processor="accounts") == 5
        assert stats.pending_operations == 5
        assert value(samples, "keybatch_keys", processor="accounts") == 2
        assert value(samples, "keybatch_active_batches", processor="accounts") == (
            stats.active_batches
        )
        assert value(samples, "keybatch_max_worker_queue", processor="accounts") == (
            stats.max_worker_queue
        )
        assert value(samples, "keybatch_stopping", processor="accounts") == 0
        await processor.flush()
    samples = scrape(registry)  # once more after the stop, then forgotten
    assert value(samples, "keybatch_operations_total", processor="accounts") == 5
    assert value(samples, "keybatch_batches_total", processor="accounts") == 2
    assert value(samples, "keybatch_pending_operations", processor="accounts") == 0
    assert value(samples, "keybatch_stopping", processor="accounts") == 1
    assert (
        value(
            samples, "keybatch_failures_total", processor="accounts", kind="operation"
        )
        == 1
    )
    assert (
        value(samples, "keybatch_failures_total", processor="accounts", kind="load")
        == 0
    )
    assert value(samples, "keybatch_conflicts_total", processor="accounts") == 0
    assert not any(labels for _, labels in scrape(registry))  # forgotten
    assert repr(collector).endswith("[]>")


@pytest.mark.anyio
async def test_collector_counts_load_failures_per_processor() -> None:
    registry = CollectorRegistry()
    collector = StatisticsCollector(registry, namespace="app")

    async def failing_load(key: str) -> Account:
        raise RuntimeError("down")

    async with (
        keybatch.open_processor(load=failing_load, min_duration=0) as bad,
        keybatch.open_processor(load=load, min_duration=0) as good,
    ):
        collector.observe(bad, "bad")
        collector.observe(good, "good")
        with pytest.raises(keybatch.LoadError):
            await bad.run("k", deposit, 1)
        await good.run("k", deposit, 1)
        samples = scrape(registry)
    assert value(samples, "app_failures_total", processor="bad", kind="load") == 1
    assert value(samples, "app_failures_total", processor="good", kind="load") == 0
    assert value(samples, "app_operations_total", processor="good") == 1


def test_observe_refuses_a_taken_name() -> None:
    collector = StatisticsCollector(None)
    first, second = object(), object()
    collector.observe(first, "p")  # type: ignore[arg-type]
    collector.observe(first, "p")  # type: ignore[arg-type]  # same one: fine
    with pytest.raises(ValueError, match="observed as 'p'"):
        collector.observe(second, "p")  # type: ignore[arg-type]
    collector.unobserve(first)  # type: ignore[arg-type]
    collector.observe(second, "p")  # type: ignore[arg-type]


def test_a_failing_statistics_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def statistics(self) -> keybatch.ProcessorStatistics:
            raise RuntimeError("no")

    registry = CollectorRegistry()
    StatisticsCollector(registry).observe(Broken(), "broken")  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="keybatch"):
        samples = scrape(registry)
    assert not any(labels for _, labels in samples)
    assert "broken" in caplog.text


def test_two_collectors_on_one_registry_clash() -> None:
    registry = CollectorRegistry()
    StatisticsCollector(registry)
    with pytest.raises(ValueError, match="Duplicated"):
        StatisticsCollector(registry)


@pytest.mark.anyio
async def test_histograms_from_reports() -> None:
    registry = CollectorRegistry()
    histograms = BatchHistograms(registry)
    async with keybatch.open_processor(
        load=load, save=save, min_duration=0.1, on_batch=histograms.hook("accounts")
    ) as processor:
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(processor.run, "a", deposit, 1)
        await processor.run("a", deposit, 1)
    samples = scrape(registry)
    sizes = {
        labels: v
        for (name, labels), v in samples.items()
        if name == "keybatch_batch_operations_count"
    }
    assert sum(sizes.values()) == 2
    assert all(("processor", "accounts") in labels for labels in sizes)
    size_sum = sum(
        v for (name, _), v in samples.items() if name == "keybatch_batch_operations_sum"
    )
    assert size_sum == 4
    assert (
        value(
            samples, "keybatch_batch_load_duration_seconds_count", processor="accounts"
        )
        == 2
    )
    assert value(
        samples, "keybatch_batch_load_duration_seconds_sum", processor="accounts"
    ) == pytest.approx(0.02)
    assert value(
        samples, "keybatch_batch_save_duration_seconds_sum", processor="accounts"
    ) == pytest.approx(0.04)
    # the batch of three is in the le=5 bucket, not in le=2; the batch of one is
    buckets: dict[str, float] = {}
    for (name, labels), v in samples.items():
        if name == "keybatch_batch_operations_bucket":
            le = dict(labels)["le"]
            buckets[le] = buckets.get(le, 0) + v
    assert (buckets["1.0"], buckets["2.0"], buckets["5.0"], buckets["+Inf"]) == (
        1,
        1,
        2,
        2,
    )


@needs_core_v2
@pytest.mark.anyio
async def test_histograms_by_close_reason() -> None:
    registry = CollectorRegistry()
    histograms = BatchHistograms(registry)
    async with keybatch.open_processor(
        load=load,
        save=save,
        min_duration=0.1,
        max_ops=2,
        on_batch=histograms.hook("p"),
    ) as processor:
        await processor.run("a", deposit, 1)  # window
        async with anyio.create_task_group() as tg:
            for _ in range(2):  # max_ops
                tg.start_soon(processor.run, "a", deposit, 1)
    samples = scrape(registry)
    assert (
        value(
            samples,
            "keybatch_batch_operations_sum",
            processor="p",
            close_reason="window",
        )
        == 1
    )
    assert (
        value(
            samples,
            "keybatch_batch_operations_sum",
            processor="p",
            close_reason="max_ops",
        )
        == 2
    )
    assert value(
        samples,
        "keybatch_batch_duration_seconds_sum",
        processor="p",
        close_reason="window",
    ) == pytest.approx(0.12)


@pytest.mark.anyio
async def test_load_failure_batches_are_labelled_none() -> None:
    registry = CollectorRegistry()
    histograms = BatchHistograms(registry)

    async def failing_load(key: str) -> Account:
        raise RuntimeError("down")

    async with keybatch.open_processor(
        load=failing_load, min_duration=0, on_batch=histograms.hook()
    ) as processor:
        with pytest.raises(keybatch.LoadError):
            await processor.run("k", deposit, 1)
    samples = scrape(registry)
    assert (
        value(
            samples,
            "keybatch_batch_operations_count",
            processor="default",
            close_reason="none",
        )
        == 1
    )
    # nothing was saved
    assert not any(
        name == "keybatch_batch_save_duration_seconds_count" and v
        for (name, _), v in samples.items()
    )


@needs_core_v2
@pytest.mark.anyio
async def test_collector_counts_conflicts() -> None:
    registry = CollectorRegistry()
    collector = StatisticsCollector(registry)
    left = [1]

    async def conflicting_save(key: str, account: Account) -> None:
        if left[0]:
            left[0] -= 1
            raise keybatch.Conflict("moved")

    async with keybatch.open_processor(
        load=load, save=conflicting_save, min_duration=0, max_replays=3
    ) as processor:
        collector.observe(processor)
        await processor.run("k", deposit, 1)
        samples = scrape(registry)
    assert value(samples, "keybatch_conflicts_total", processor="default") == 1


def test_a_failing_hook_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    histograms = BatchHistograms(CollectorRegistry())
    hook = histograms.hook()
    with caplog.at_level(logging.DEBUG, logger="keybatch"):
        hook("not a report")  # type: ignore[arg-type]
        hook("not a report")  # type: ignore[arg-type]
    assert histograms.errors == 2
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.DEBUG]


def test_a_read_that_meets_the_loop_mid_change_is_retried() -> None:
    """statistics() from a scrape thread can raise RuntimeError; read again."""
    stats = keybatch.ProcessorStatistics(
        workers=1,
        keys=0,
        active_batches=0,
        pending_operations=7,
        operations_done=0,
        batches_done=0,
        load_failures=0,
        save_failures=0,
        operation_failures=0,
        operations_withdrawn=0,
        stopping=False,
    )

    class Busy:
        failures = 3

        def statistics(self) -> keybatch.ProcessorStatistics:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("dictionary changed size during iteration")
            return stats

    registry = CollectorRegistry()
    StatisticsCollector(registry).observe(Busy(), "busy")  # type: ignore[arg-type]
    assert value(scrape(registry), "keybatch_pending_operations", processor="busy") == 7
