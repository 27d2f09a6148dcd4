"""CPU cost of the keybatch.contrib on_batch hooks, per batch report.

``python -m benchmarks.hook_cost [--reports 50000]`` (needs the ``otel`` and
``prometheus`` extras and ``opentelemetry-sdk``). The hooks run on the worker
after every batch, so this is what monitoring adds to each batch (not to each
operation). Spans go to a ``BatchSpanProcessor`` with an exporter that drops
them; metrics to an in-memory reader. Best of three runs, CPU time.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from prometheus_client import CollectorRegistry

import keybatch
from keybatch.contrib.opentelemetry import BatchTracer
from keybatch.contrib.prometheus import BatchHistograms


class Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def cost(hook: Callable[[keybatch.BatchReport], None], n: int) -> float:
    """Best of three: CPU microseconds per call."""
    report = keybatch.BatchReport(
        key="account:17",
        worker=3,
        start=1.0,
        operations=10,
        load_duration=0.002,
        save_duration=0.003,
        error=None,
        close_reason="window",
        duration=0.105,
        wall_start=time.time(),
    )
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        for _ in range(n):
            hook(report)
        best = min(best, time.process_time() - started)
    return best / n * 1e6


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reports", type=int, default=50_000)
    n = parser.parse_args(argv).reports

    def tracer_provider(sampler: TraceIdRatioBased | None = None) -> TracerProvider:
        provider = (
            TracerProvider() if sampler is None else TracerProvider(sampler=sampler)
        )
        provider.add_span_processor(BatchSpanProcessor(Drop(), max_queue_size=n + 1))
        return provider

    meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
    rows = [
        ("BatchTracer, opentelemetry-api only (no SDK)", BatchTracer()),
        (
            "BatchTracer, SDK metrics, no tracer provider",
            BatchTracer(meter_provider=meters),
        ),
        (
            "BatchTracer, SDK spans (1% sampled) + metrics",
            BatchTracer(
                tracer_provider=tracer_provider(TraceIdRatioBased(0.01)),
                meter_provider=meters,
            ),
        ),
        (
            "BatchTracer, SDK spans (all) + metrics",
            BatchTracer(tracer_provider=tracer_provider(), meter_provider=meters),
        ),
        (
            "BatchHistograms.hook (prometheus_client)",
            BatchHistograms(CollectorRegistry()).hook(),
        ),
    ]
    print(f"{'hook':<48} {'us per report':>13}")
    for name, hook in rows:
        print(f"{name:<48} {cost(hook, n):13.1f}")


if __name__ == "__main__":
    main()
