"""Prometheus metrics for a processor (extra `prometheus`).

Two pieces, usable apart:

- [`StatisticsCollector`][keybatch.contrib.prometheus.StatisticsCollector]: a
  custom collector that reads [`statistics()`][keybatch.Processor.statistics] at
  each scrape (queues as gauges, totals as counters);
- [`BatchHistograms`][keybatch.contrib.prometheus.BatchHistograms]: `on_batch`
  hooks that put each [`BatchReport`][keybatch.BatchReport] into histograms
  (batch size, batch, load and save durations).

```python
from keybatch.contrib.prometheus import BatchHistograms, StatisticsCollector

collector = StatisticsCollector()  # registers with prometheus_client.REGISTRY
histograms = BatchHistograms()
async with keybatch.open_processor(
    load=load, save=save, on_batch=histograms.hook("accounts")
) as processor:
    collector.observe(processor, "accounts")
```

Every series carries a `processor` label, the name given to `observe` and
`hook`. Create each class once per registry: metric names are unique in a
registry. The Monitoring page of the docs says what to watch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, final

from prometheus_client import REGISTRY, CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from keybatch import BatchReport

from . import _read_statistics
from ._buckets import DURATION_BUCKETS, SIZE_BUCKETS

if TYPE_CHECKING:
    from keybatch import Processor, ProcessorStatistics

__all__ = ["BatchHistograms", "StatisticsCollector"]

logger = logging.getLogger("keybatch.contrib.prometheus")


# (metric name without the namespace, statistics field, help)
_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("workers", "workers", "Worker tasks."),
    (
        "max_worker_queue",
        "max_worker_queue",
        "Operations accepted and not yet applied on the busiest worker.",
    ),
    (
        "pending_operations",
        "pending_operations",
        "Accepted operations whose outcome is not delivered yet.",
    ),
    ("keys", "keys", "Keys holding state: pending operations or a batch in flight."),
    ("active_batches", "active_batches", "Batches loading, open, or saving."),
    (
        "exclusive_sections",
        "exclusive_sections",
        "exclusive() sections holding their keys.",
    ),
    ("stopping", "stopping", "1 once the processor began to stop."),
)
_COUNTERS: tuple[tuple[str, str, str], ...] = (
    (
        "operations",
        "operations_done",
        "Operations whose outcome (value or exception) was delivered.",
    ),
    ("batches", "batches_done", "Batches finished, failed ones included."),
    (
        "operations_withdrawn",
        "operations_withdrawn",
        "Operations withdrawn by cancelled callers before they were applied.",
    ),
    ("conflicts", "conflicts", "Saves that raised keybatch.Conflict."),
)
# keybatch_failures_total{kind=...}: statistics field per kind
_FAILURES: tuple[tuple[str, str], ...] = (
    ("load", "load_failures"),
    ("save", "save_failures"),
    ("operation", "operation_failures"),
)


def _finished(stats: ProcessorStatistics) -> bool:
    return (
        stats.stopping
        and stats.keys == 0
        and stats.pending_operations == 0
        and stats.active_batches == 0
    )


@final
class StatisticsCollector:
    """A Prometheus collector over processors' statistics.

    At each scrape it reads every observed processor's
    [`statistics()`][keybatch.Processor.statistics] and yields,
    labelled `processor`:

    - gauges `keybatch_workers`, `keybatch_max_worker_queue` (the main operating
      signal of a fixed pool), `keybatch_pending_operations`, `keybatch_keys`,
      `keybatch_active_batches`, `keybatch_exclusive_sections`,
      `keybatch_stopping`;
    - counters `keybatch_operations_total`, `keybatch_batches_total`,
      `keybatch_failures_total{kind="load"|"save"|"operation"}` (load and
      save count batches, operation counts operations that raised),
      `keybatch_operations_withdrawn_total`, `keybatch_conflicts_total`.

    A scrape runs in the HTTP server's thread; it only reads counters. A
    processor whose statistics cannot be read is left out of that scrape and
    the failure is logged. A processor that has stopped (stopping, with no key,
    pending operation or batch left) is scraped once more, then forgotten.

    Args:
        registry: Where to register; None registers nowhere (call
            `registry.register(collector)` yourself).
        namespace: Prefix of the metric names.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = REGISTRY,
        *,
        namespace: str = "keybatch",
    ) -> None:
        self._namespace = namespace
        self._lock = threading.Lock()
        self._observed: tuple[tuple[Processor[Any], str], ...] = ()
        if registry is not None:
            registry.register(self)

    def __repr__(self) -> str:
        names = [name for _, name in self._observed]
        return f"<keybatch.contrib.prometheus.StatisticsCollector {names}>"

    def observe(self, processor: Processor[Any], name: str = "default") -> None:
        """Report `processor` under the label `processor=name`.

        Observing the same processor again replaces its name.

        Raises:
            ValueError: Another processor is observed under `name`.
        """
        with self._lock:
            kept = tuple(o for o in self._observed if o[0] is not processor)
            if any(n == name for _, n in kept):
                raise ValueError(f"a processor is observed as {name!r} already")
            self._observed = (*kept, (processor, name))

    def unobserve(self, processor: Processor[Any]) -> None:
        """Stop reporting `processor` (nothing happens if not observed)."""
        with self._lock:
            self._observed = tuple(o for o in self._observed if o[0] is not processor)

    def _families(
        self,
    ) -> tuple[
        dict[str, GaugeMetricFamily],
        dict[str, CounterMetricFamily],
        CounterMetricFamily,
    ]:
        ns = self._namespace
        gauges = {
            field: GaugeMetricFamily(f"{ns}_{name}", doc, labels=["processor"])
            for name, field, doc in _GAUGES
        }
        counters = {
            field: CounterMetricFamily(f"{ns}_{name}", doc, labels=["processor"])
            for name, field, doc in _COUNTERS
        }
        failures = CounterMetricFamily(
            f"{ns}_failures",
            "Failed loads and saves (batches) and operations that raised.",
            labels=["processor", "kind"],
        )
        return gauges, counters, failures

    def describe(self) -> Iterable[Metric]:
        """The metric families, without samples (for the registry's name check)."""
        gauges, counters, failures = self._families()
        return [*gauges.values(), *counters.values(), failures]

    def collect(self) -> Iterable[Metric]:
        """Read every observed processor's statistics: one sample each."""
        gauges, counters, failures = self._families()
        done: list[tuple[Processor[Any], str]] = []
        for processor, name in self._observed:
            try:
                stats = _read_statistics(processor)
            except Exception:
                logger.warning(
                    "keybatch: statistics() of processor %r failed", name, exc_info=True
                )
                continue
            for field, gauge in gauges.items():
                gauge.add_metric([name], float(getattr(stats, field)))
            for field, counter in counters.items():
                counter.add_metric([name], float(getattr(stats, field)))
            for kind, field in _FAILURES:
                failures.add_metric([name, kind], float(getattr(stats, field)))
            if _finished(stats):
                done.append((processor, name))
        if done:
            with self._lock:
                self._observed = tuple(o for o in self._observed if o not in done)
        return [*gauges.values(), *counters.values(), failures]


@final
class BatchHistograms:
    """Histograms of batches, fed by `on_batch` hooks.

    Histograms, labelled `processor`:

    - `keybatch_batch_operations` (also labelled `close_reason`: `window`,
      `max_ops`, `flush`, `stop`, or `none` when the load failed): operations
      per batch;
    - `keybatch_batch_duration_seconds` (also labelled `close_reason`): batch
      start to delivery of its outcomes;
    - `keybatch_batch_load_duration_seconds`: time in load;
    - `keybatch_batch_save_duration_seconds`: time in save, for batches that
      saved (a failed save included).

    Args:
        registry: Where the histograms are registered; None registers nowhere.
        namespace: Prefix of the metric names.
        size_buckets: Bucket bounds of `keybatch_batch_operations`.
        duration_buckets: Bucket bounds of the duration histograms, seconds.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = REGISTRY,
        *,
        namespace: str = "keybatch",
        size_buckets: Sequence[float] = SIZE_BUCKETS,
        duration_buckets: Sequence[float] = DURATION_BUCKETS,
    ) -> None:
        self._size = Histogram(
            "batch_operations",
            "Operations per batch.",
            ["processor", "close_reason"],
            namespace=namespace,
            registry=registry,
            buckets=size_buckets,
        )
        self._duration = Histogram(
            "batch_duration_seconds",
            "Batch start to delivery of its outcomes.",
            ["processor", "close_reason"],
            namespace=namespace,
            registry=registry,
            buckets=duration_buckets,
        )
        self._load = Histogram(
            "batch_load_duration_seconds",
            "Time in load, per batch.",
            ["processor"],
            namespace=namespace,
            registry=registry,
            buckets=duration_buckets,
        )
        self._save = Histogram(
            "batch_save_duration_seconds",
            "Time in save, per batch that saved.",
            ["processor"],
            namespace=namespace,
            registry=registry,
            buckets=duration_buckets,
        )
        self._errors = 0

    @property
    def errors(self) -> int:
        """Times a hook failed inside (and logged it)."""
        return self._errors

    def hook(self, name: str = "default") -> Callable[[BatchReport], None]:
        """An `on_batch` hook that records into these histograms as `processor=name`.

        The hook never raises: a failure inside is logged (WARNING the first
        time, DEBUG after) and counted in
        [`errors`][keybatch.contrib.prometheus.BatchHistograms.errors].
        """
        load = self._load.labels(processor=name)
        save = self._save.labels(processor=name)
        by_reason: dict[str | None, tuple[Any, Any]] = {}

        def on_batch(report: BatchReport) -> None:
            try:
                pair = by_reason.get(report.close_reason)
                if pair is None:
                    reason = report.close_reason or "none"
                    pair = (
                        self._size.labels(processor=name, close_reason=reason),
                        self._duration.labels(processor=name, close_reason=reason),
                    )
                    by_reason[report.close_reason] = pair
                pair[0].observe(report.operations)
                pair[1].observe(report.duration)
                load.observe(report.load_duration)
                if report.save_duration is not None:
                    save.observe(report.save_duration)
            except Exception:
                self._errors += 1
                level = logging.WARNING if self._errors == 1 else logging.DEBUG
                logger.log(
                    level, "keybatch: Prometheus on_batch hook failed", exc_info=True
                )

        return on_batch
