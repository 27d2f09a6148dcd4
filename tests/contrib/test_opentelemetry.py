"""keybatch.contrib.opentelemetry: spans, metrics and gauges from real processors.

Spans and metric points are read back through the OpenTelemetry SDK's in-memory
exporter and reader. Tests marked ``needs_core_v2`` check report fields and
behaviour of the core v2 (replays, close reasons, callers' contexts in ops); they
are skipped while the core does not take ``max_replays``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode

import keybatch
from keybatch.contrib import combine_hooks
from keybatch.contrib.opentelemetry import SIZE_BUCKETS, BatchTracer

CORE_V2 = "max_replays" in inspect.signature(keybatch.open_processor).parameters
needs_core_v2 = pytest.mark.skipif(
    not CORE_V2, reason="needs the core v2 (BatchReport fields, contexts, replays)"
)


class Telemetry:
    """An SDK tracer and meter provider reading into memory, and a BatchTracer."""

    def __init__(self, **options: Any) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.hook = BatchTracer(
            tracer_provider=self.tracer_provider,
            meter_provider=self.meter_provider,
            **options,
        )
        # The callers' tracer: spans the test opens around its calls.
        self.caller_tracer = self.tracer_provider.get_tracer("test")

    def batch_spans(self) -> list[ReadableSpan]:
        return [
            s for s in self.spans.get_finished_spans() if s.name == "keybatch.batch"
        ]

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found: list[Any] = []
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found

    def histogram(self, name: str) -> HistogramDataPoint:
        (point,) = self.points(name)
        assert isinstance(point, HistogramDataPoint)
        return point

    def counts(self, name: str) -> dict[tuple[tuple[str, Any], ...], float]:
        out = {}
        for point in self.points(name):
            assert isinstance(point, NumberDataPoint)
            out[tuple(sorted(point.attributes.items()))] = point.value
        return out


class Account:
    def __init__(self) -> None:
        self.balance = 0


def deposit(account: Account, amount: int) -> int:
    account.balance += amount
    return account.balance


async def fresh(key: str) -> Account:
    return Account()


def refuse(account: Account) -> None:
    raise ValueError("refused")


class Store:
    def __init__(self, load_delay: float = 0.01, save_delay: float = 0.02) -> None:
        self.load_delay = load_delay
        self.save_delay = save_delay
        self.data: dict[str, int] = {}

    async def load(self, key: str) -> Account:
        await anyio.sleep(self.load_delay)
        account = Account()
        account.balance = self.data.get(key, 0)
        return account

    async def save(self, key: str, account: Account) -> None:
        await anyio.sleep(self.save_delay)
        self.data[key] = account.balance


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    t = Telemetry()
    yield t
    t.tracer_provider.shutdown()
    t.meter_provider.shutdown()


# ---------------------------------------------------------------------------
# Spans
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_one_span_per_batch_with_its_attributes(telemetry: Telemetry) -> None:
    store = Store()
    async with (
        keybatch.open_processor(
            load=store.load,
            save=store.save,
            min_duration=0.1,
            workers=4,
            on_batch=telemetry.hook,
        ) as processor,
        anyio.create_task_group() as tg,
    ):
        for _ in range(3):
            tg.start_soon(processor.run, "alpha", deposit, 1)
        tg.start_soon(processor.run, "beta", deposit, 5)
    spans = {s.attributes["keybatch.key"]: s for s in telemetry.batch_spans()}
    assert sorted(spans) == ["alpha", "beta"]
    alpha = spans["alpha"]
    assert alpha.attributes is not None
    assert alpha.kind == trace.SpanKind.INTERNAL
    assert alpha.parent is None  # a root: batches serve many callers
    assert alpha.attributes["keybatch.operations"] == 3
    assert alpha.attributes["keybatch.worker"] == keybatch.worker_for_key("alpha", 4)
    assert alpha.attributes["keybatch.load.duration"] == pytest.approx(0.01)
    assert alpha.attributes["keybatch.save.duration"] == pytest.approx(0.02)
    assert alpha.attributes["keybatch.replays"] == 0
    assert alpha.attributes["keybatch.operations.failed"] == 0
    assert alpha.attributes["keybatch.operations.withdrawn"] == 0
    assert "error.type" not in alpha.attributes
    assert alpha.status.status_code == StatusCode.UNSET
    assert spans["beta"].attributes is not None
    assert spans["beta"].attributes["keybatch.operations"] == 1
    assert telemetry.hook.errors == 0


@needs_core_v2
@pytest.mark.anyio
async def test_span_times_and_close_reason(telemetry: Telemetry) -> None:
    store = Store()
    async with keybatch.open_processor(
        load=store.load,
        save=store.save,
        min_duration=0.1,
        max_ops=2,
        on_batch=telemetry.hook,
    ) as processor:
        await processor.run("k", deposit, 1)  # window: closes at 0.1 s
        async with anyio.create_task_group() as tg:
            for _ in range(2):  # max_ops
                tg.start_soon(processor.run, "k", deposit, 1)
    first, second = sorted(telemetry.batch_spans(), key=lambda s: s.start_time or 0)
    assert first.attributes is not None
    assert second.attributes is not None
    assert first.attributes["keybatch.close_reason"] == "window"
    assert second.attributes["keybatch.close_reason"] == "max_ops"
    assert first.start_time is not None
    assert first.end_time is not None
    # start to delivery: the 0.1 s window, then the 0.02 s save (virtual time)
    assert (first.end_time - first.start_time) / 1e9 == pytest.approx(0.12, abs=1e-6)


@pytest.mark.anyio
async def test_failed_load_sets_error_status(telemetry: Telemetry) -> None:
    async def load(key: str) -> Account:
        raise RuntimeError("store down")

    async with keybatch.open_processor(
        load=load, min_duration=0, on_batch=telemetry.hook
    ) as processor:
        with pytest.raises(keybatch.LoadError):
            await processor.run("k", telemetry.hook.traced("k", deposit), 1)
    (span,) = telemetry.batch_spans()
    assert span.attributes is not None
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == "RuntimeError"
    assert span.attributes["keybatch.failure.kind"] == "load"
    assert "keybatch.save.duration" not in span.attributes
    assert not span.links  # nothing was applied
    (event,) = span.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.type"].endswith("LoadError")
    assert telemetry.counts("keybatch.failures") == {
        (("error.type", "RuntimeError"), ("keybatch.failure.kind", "load")): 1
    }


@pytest.mark.anyio
async def test_failed_save_records_may_have_landed(telemetry: Telemetry) -> None:
    async def save(key: str, account: Account) -> None:
        await anyio.sleep(0.01)
        raise OSError("disk full")

    async with keybatch.open_processor(
        load=Store().load, save=save, min_duration=0, on_batch=telemetry.hook
    ) as processor:
        with pytest.raises(keybatch.SaveError):
            await processor.run("k", deposit, 1)
    (span,) = telemetry.batch_spans()
    assert span.attributes is not None
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == "OSError"
    assert span.attributes["keybatch.failure.kind"] == "save"
    assert span.attributes["keybatch.save.may_have_landed"] is True
    assert telemetry.counts("keybatch.failures") == {
        (("error.type", "OSError"), ("keybatch.failure.kind", "save")): 1
    }
    # the failed save's duration carries its error type
    (save_point,) = telemetry.points("keybatch.batch.save.duration")
    assert save_point.attributes == {"error.type": "OSError"}


@pytest.mark.anyio
async def test_record_keys_off_and_extra_attributes() -> None:
    telemetry = Telemetry(record_keys=False, attributes={"keybatch.processor": "acc"})
    async with keybatch.open_processor(
        min_duration=0, on_batch=telemetry.hook
    ) as processor:
        await processor.run("secret-user-id", lambda r: None)
    (span,) = telemetry.batch_spans()
    assert span.attributes is not None
    assert "keybatch.key" not in span.attributes
    assert span.attributes["keybatch.processor"] == "acc"
    point = telemetry.histogram("keybatch.batch.operations")
    assert point.attributes is not None
    assert point.attributes["keybatch.processor"] == "acc"


def test_non_str_keys_become_their_repr(telemetry: Telemetry) -> None:
    report = keybatch.BatchReport(
        key=b"k\x00",
        worker=0,
        start=0.0,
        operations=1,
        load_duration=0.0,
        save_duration=None,
        error=None,
    )
    telemetry.hook(report)
    (span,) = telemetry.batch_spans()
    assert span.attributes is not None
    assert span.attributes["keybatch.key"] == "b'k\\x00'"


# ---------------------------------------------------------------------------
# Links to the callers' spans
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_ops_without_a_current_span_link_nothing(telemetry: Telemetry) -> None:
    async with keybatch.open_processor(
        load=fresh, min_duration=0, on_batch=telemetry.hook
    ) as processor:
        await processor.run("k", telemetry.hook.traced("k", deposit), 1)
    (span,) = telemetry.batch_spans()
    assert not span.links


@needs_core_v2
@pytest.mark.anyio
async def test_batch_span_links_each_callers_span(telemetry: Telemetry) -> None:
    callers: dict[int, trace.SpanContext] = {}

    async def caller(i: int) -> None:
        with telemetry.caller_tracer.start_as_current_span(f"request {i}") as span:
            callers[i] = span.get_span_context()
            await processor.run("k", telemetry.hook.traced("k", deposit), i)

    async with keybatch.open_processor(
        load=fresh, min_duration=0.1, on_batch=telemetry.hook
    ) as processor:
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(caller, i)
        await processor.run("k", telemetry.hook.traced("k", deposit), 9)  # no span
    first, second = sorted(telemetry.batch_spans(), key=lambda s: s.start_time or 0)
    # one link per caller (in call order, which trio varies between tasks)
    assert sorted(link.context.span_id for link in first.links) == sorted(
        c.span_id for c in callers.values()
    )
    assert not second.links  # the captures went with their batch


@needs_core_v2
@pytest.mark.anyio
async def test_replayed_ops_link_once_and_conflicts_count(
    telemetry: Telemetry,
) -> None:
    conflicts_left = [2]

    async def save(key: str, account: Account) -> None:
        if conflicts_left[0]:
            conflicts_left[0] -= 1
            raise keybatch.Conflict("moved")

    async with keybatch.open_processor(
        load=Store().load,
        save=save,
        min_duration=0,
        max_replays=3,
        on_batch=telemetry.hook,
    ) as processor:
        with telemetry.caller_tracer.start_as_current_span("request") as caller:
            assert await processor.run("k", telemetry.hook.traced("k", deposit), 1)
    (span,) = telemetry.batch_spans()
    assert span.attributes is not None
    assert span.attributes["keybatch.replays"] == 2
    assert [link.context for link in span.links] == [caller.get_span_context()]
    assert span.status.status_code == StatusCode.UNSET
    assert telemetry.counts("keybatch.conflicts") == {(): 2}


@needs_core_v2
@pytest.mark.anyio
async def test_conflicts_past_max_replays(telemetry: Telemetry) -> None:
    async def save(key: str, account: Account) -> None:
        raise keybatch.Conflict("moved")

    async with keybatch.open_processor(
        load=Store().load,
        save=save,
        min_duration=0,
        max_replays=2,
        on_batch=telemetry.hook,
    ) as processor:
        with pytest.raises(keybatch.SaveError):
            await processor.run("k", deposit, 1)
    (span,) = telemetry.batch_spans()
    assert span.attributes is not None
    assert span.attributes["keybatch.replays"] == 2
    assert span.attributes["keybatch.save.may_have_landed"] is False
    assert span.attributes["error.type"] == "keybatch.Conflict"
    assert telemetry.counts("keybatch.conflicts") == {(): 3}


def test_links_are_capped(telemetry: Telemetry) -> None:
    hook = BatchTracer(
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
        max_links=2,
    )
    op = hook.traced("k", deposit)
    account = Account()
    for i in range(4):
        with telemetry.caller_tracer.start_as_current_span(f"request {i}"):
            op(account, 1)
    assert account.balance == 4
    hook(
        keybatch.BatchReport(
            key="k",
            worker=0,
            start=0.0,
            operations=4,
            load_duration=0.0,
            save_duration=0.0,
            error=None,
        )
    )
    (span,) = telemetry.batch_spans()
    assert len(span.links) == 2


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_histograms(telemetry: Telemetry) -> None:
    store = Store()
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=0.1, on_batch=telemetry.hook
    ) as processor:
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(processor.run, "a", deposit, 1)
        await processor.run("a", deposit, 1)
    size = telemetry.histogram("keybatch.batch.operations")
    assert (size.count, size.sum) == (2, 6)
    assert tuple(size.explicit_bounds) == SIZE_BUCKETS
    load = telemetry.histogram("keybatch.batch.load.duration")
    assert load.count == 2
    assert load.sum == pytest.approx(0.02)
    save = telemetry.histogram("keybatch.batch.save.duration")
    assert save.count == 2
    assert save.sum == pytest.approx(0.04)
    assert telemetry.points("keybatch.batch.duration")


@needs_core_v2
@pytest.mark.anyio
async def test_batch_duration_by_close_reason(telemetry: Telemetry) -> None:
    store = Store()
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=0.1, on_batch=telemetry.hook
    ) as processor:
        await processor.run("a", deposit, 1)
    point = telemetry.histogram("keybatch.batch.duration")
    assert point.attributes == {"keybatch.close_reason": "window"}
    assert point.sum == pytest.approx(0.12)


@needs_core_v2
@pytest.mark.anyio
async def test_failed_and_withdrawn_operations_count(telemetry: Telemetry) -> None:
    async def refused() -> None:
        with pytest.raises(ValueError, match="refused"):
            await processor.run("a", refuse)

    async def gives_up() -> None:
        with anyio.move_on_after(0.05):  # the window closes at 0.1 s
            await processor.run("a", deposit, 100)

    async with keybatch.open_processor(
        load=fresh, min_duration=0.1, on_batch=telemetry.hook
    ) as processor:
        async with anyio.create_task_group() as tg:
            tg.start_soon(processor.run, "a", deposit, 1)
            tg.start_soon(refused)
            tg.start_soon(gives_up)
    (span,) = telemetry.batch_spans()
    assert span.attributes is not None
    assert span.attributes["keybatch.operations.failed"] == 1
    assert span.attributes["keybatch.operations.withdrawn"] == 1
    assert telemetry.counts("keybatch.failures") == {
        (("keybatch.failure.kind", "operation"),): 1
    }
    assert telemetry.counts("keybatch.operations.withdrawn") == {(): 1}


# ---------------------------------------------------------------------------
# Gauges
# ---------------------------------------------------------------------------


def gauge_values(telemetry: Telemetry, name: str) -> list[float]:
    return [p.value for p in telemetry.points(name)]


@pytest.mark.anyio
async def test_gauges_follow_statistics(telemetry: Telemetry) -> None:
    async with keybatch.open_processor(
        load=Store(load_delay=0.5).load,
        min_duration=0.1,
        max_duration=1.0,
        workers=2,
        on_batch=telemetry.hook,
    ) as processor:
        telemetry.hook.observe(processor, attributes={"keybatch.processor": "p"})
        for i in range(3):
            processor.submit(f"key{i}", deposit, 1)
        await anyio.sleep(0.2)  # loads in flight
        stats = processor.statistics()
        (pending,) = telemetry.points("keybatch.operations.pending")
        assert pending.value == stats.pending_operations == 3
        assert pending.attributes == {"keybatch.processor": "p"}
        assert gauge_values(telemetry, "keybatch.keys") == [3]
        assert gauge_values(telemetry, "keybatch.batches.active") == [
            stats.active_batches
        ]
        assert gauge_values(telemetry, "keybatch.worker_queue.max") == [
            stats.max_worker_queue
        ]
        assert gauge_values(telemetry, "keybatch.exclusive_sections") == [0]
    # stopped: reported once more with zeros, then forgotten
    assert gauge_values(telemetry, "keybatch.operations.pending") == [0]
    assert "observing=0" in repr(telemetry.hook)


@needs_core_v2
@pytest.mark.anyio
async def test_max_worker_queue_gauge(telemetry: Telemetry) -> None:
    async with keybatch.open_processor(
        load=Store(load_delay=0.5).load,
        min_duration=0.1,
        max_duration=1.0,
        workers=1,
    ) as processor:
        telemetry.hook.observe(processor)
        for i in range(4):
            processor.submit(f"key{i}", deposit, 1)
        await anyio.lowlevel.checkpoint()
        assert gauge_values(telemetry, "keybatch.worker_queue.max") == [4]


@pytest.mark.anyio
async def test_unobserve_and_observe_again(telemetry: Telemetry) -> None:
    async with keybatch.open_processor(min_duration=0) as processor:
        telemetry.hook.observe(processor, attributes={"n": 1})
        telemetry.hook.observe(processor, attributes={"n": 2})  # replaces
        (point,) = telemetry.points("keybatch.keys")
        assert point.attributes == {"n": 2}
        telemetry.hook.unobserve(processor)
        assert "observing=0" in repr(telemetry.hook)


# ---------------------------------------------------------------------------
# Never raise into the worker
# ---------------------------------------------------------------------------


class BrokenTracerProvider(trace.TracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return BrokenTracer()


class BrokenTracer(trace.NoOpTracer):
    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        raise RuntimeError("exporter exploded")


@pytest.mark.anyio
async def test_a_failing_tracer_never_reaches_the_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hook = BatchTracer(tracer_provider=BrokenTracerProvider())
    with caplog.at_level(logging.DEBUG, logger="keybatch"):
        async with keybatch.open_processor(
            load=fresh, min_duration=0, on_batch=hook
        ) as p:
            assert await p.run("k", deposit, 1) == 1
            assert await p.run("k", deposit, 1) == 1
    assert hook.errors == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # then DEBUG
    assert warnings[0].name == "keybatch.contrib.opentelemetry"


@pytest.mark.anyio
async def test_a_failing_gauge_is_logged_not_raised(telemetry: Telemetry) -> None:
    class Broken:
        def statistics(self) -> keybatch.ProcessorStatistics:
            raise RuntimeError("no")

    telemetry.hook.observe(Broken())  # type: ignore[arg-type]
    assert telemetry.points("keybatch.keys") == []
    assert telemetry.hook.errors >= 1


def test_max_links_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="max_links"):
        BatchTracer(max_links=-1)


# ---------------------------------------------------------------------------
# combine_hooks
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_combine_hooks_calls_each_despite_failures(
    telemetry: Telemetry, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[keybatch.BatchReport] = []

    def broken(report: keybatch.BatchReport) -> None:
        raise RuntimeError("broken hook")

    hook = combine_hooks(broken, telemetry.hook, seen.append)
    async with keybatch.open_processor(load=fresh, min_duration=0, on_batch=hook) as p:
        await p.run("k", deposit, 1)
    assert len(seen) == 1
    assert len(telemetry.batch_spans()) == 1
    assert any("broken" in r.getMessage() for r in caplog.records)


def test_combine_hooks_refuses_non_callables() -> None:
    with pytest.raises(TypeError):
        combine_hooks(42)  # type: ignore[arg-type]
