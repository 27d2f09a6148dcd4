"""OpenTelemetry spans and metrics for a processor (extra `otel`).

[`BatchTracer`][keybatch.contrib.opentelemetry.BatchTracer] is an `on_batch` hook:
it turns each [`BatchReport`][keybatch.BatchReport] into one span and into metric
points, and with [`observe`][keybatch.contrib.opentelemetry.BatchTracer.observe]
it reports a processor's queues as observable gauges.

```python
from keybatch.contrib.opentelemetry import BatchTracer

tracer = BatchTracer(attributes={"keybatch.processor": "accounts"})
async with keybatch.open_processor(load=load, save=save, on_batch=tracer) as p:
    tracer.observe(p)
    await p.run(key, tracer.traced(key, deposit), 10)  # links the batch span
```

It needs only `opentelemetry-api`; without an SDK configured every call is a
no-op. The Monitoring page of the docs says what to watch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, final

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from keybatch import BatchReport, Conflict, LoadError, SaveError

from . import _read_statistics
from ._buckets import DURATION_BUCKETS, SIZE_BUCKETS

if TYPE_CHECKING:
    from keybatch import Processor, ProcessorStatistics

__all__ = ["BatchTracer"]

logger = logging.getLogger("keybatch.contrib.opentelemetry")

R = TypeVar("R")
T = TypeVar("T")
P = ParamSpec("P")

Attributes = Mapping[str, AttributeValue]


# Keys whose captured caller contexts wait for their batch's report. Bounded so
# that a traced() op used without this tracer as the hook cannot grow it forever.
_MAX_KEYS_WAITING = 100_000

# Batch spans are roots: the hook runs in the worker's context, whose current
# span (if any) is whatever was current when the processor opened, not a cause.
_ROOT = Context()


def _package_version() -> str:
    try:
        return version("keybatch")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return ""


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _key_text(key: Hashable) -> str:
    return key if isinstance(key, str) else repr(key)


def _conflicts(report: BatchReport) -> int:
    """Saves that raised Conflict in this batch: each replay, plus a final one."""
    n = report.replays
    error = report.error
    if isinstance(error, SaveError) and isinstance(error.__cause__, Conflict):
        n += 1
    return n


def _finished(stats: ProcessorStatistics) -> bool:
    return (
        stats.stopping
        and stats.keys == 0
        and stats.pending_operations == 0
        and stats.active_batches == 0
    )


class _Observed:
    """A processor whose statistics feed the gauges."""

    __slots__ = ("attributes", "finished_in", "processor", "snapshot", "used_by")

    def __init__(self, processor: Processor[Any], attributes: dict[str, Any]) -> None:
        self.processor = processor
        self.attributes = attributes
        self.finished_in: set[str] = set()
        # One statistics() read serves each gauge once: a collection round
        # reads it once, and a gauge asking again starts the next round.
        self.snapshot: ProcessorStatistics | None = None
        self.used_by: set[str] = set()

    def statistics(self, gauge: str) -> ProcessorStatistics:
        snapshot = self.snapshot
        if snapshot is None or gauge in self.used_by:
            snapshot = self.snapshot = _read_statistics(self.processor)
            self.used_by = {gauge}
        else:
            self.used_by.add(gauge)
        return snapshot


# (gauge name, statistics field, unit, description)
_GAUGES: tuple[tuple[str, str, str, str], ...] = (
    (
        "keybatch.worker_queue.max",
        "max_worker_queue",
        "{operation}",
        "Operations accepted and not yet applied on the busiest worker.",
    ),
    (
        "keybatch.operations.pending",
        "pending_operations",
        "{operation}",
        "Accepted operations whose outcome is not delivered yet.",
    ),
    (
        "keybatch.keys",
        "keys",
        "{key}",
        "Keys holding state: pending operations or a batch in flight.",
    ),
    (
        "keybatch.batches.active",
        "active_batches",
        "{batch}",
        "Batches loading, open, or saving.",
    ),
    (
        "keybatch.exclusive_sections",
        "exclusive_sections",
        "{section}",
        "exclusive() sections holding their keys.",
    ),
)


@final
class BatchTracer:
    """An `on_batch` hook that reports batches to OpenTelemetry.

    Each [`BatchReport`][keybatch.BatchReport] becomes:

    - one span named `span_name`, a root span (batches serve many callers, so
      none of them is its parent), from `wall_start` to `wall_start + duration`,
      linked to the spans of the callers whose operations it applied (see
      [`traced`][keybatch.contrib.opentelemetry.BatchTracer.traced]). Attributes:
      `keybatch.key` (when `record_keys`), `keybatch.worker`,
      `keybatch.operations`, `keybatch.operations.failed`,
      `keybatch.operations.withdrawn`, `keybatch.close_reason`,
      `keybatch.load.duration`, `keybatch.save.duration`, `keybatch.replays`,
      and, for a failed batch, `error.type` (the cause's type),
      `keybatch.failure.kind` (`"load"` or `"save"`),
      `keybatch.save.may_have_landed`, status ERROR and an exception event;
    - points on histograms `keybatch.batch.operations`,
      `keybatch.batch.duration`, `keybatch.batch.load.duration`,
      `keybatch.batch.save.duration` (seconds; only batches that saved);
    - counts on `keybatch.failures` (attribute `keybatch.failure.kind`: `load`
      and `save` count batches, `operation` counts operations that raised),
      `keybatch.conflicts` (saves that raised [`Conflict`][keybatch.Conflict])
      and `keybatch.operations.withdrawn`.

    The batch size and batch duration points carry `keybatch.close_reason`;
    the duration points of a failed batch carry `error.type`. Every point and
    span also carries `attributes`. Keys never become metric attributes (their
    number is unbounded).

    The hook never raises and never blocks on I/O by itself: a failure inside it
    is logged (WARNING the first time, DEBUG after) and counted in
    [`errors`][keybatch.contrib.opentelemetry.BatchTracer.errors]. Export with
    a `BatchSpanProcessor` (a `SimpleSpanProcessor` exports inside `span.end()`,
    on the worker, and would stall its keys).

    Use one `BatchTracer` per processor: the callers' contexts are kept by key.

    Args:
        tracer_provider: Where spans go. Default: the global provider.
        meter_provider: Where metrics go. Default: the global provider.
        attributes: Added to every span and metric point, e.g.
            `{"keybatch.processor": "accounts"}`.
        span_name: Name of the batch spans.
        record_keys: Put the key on the span as `keybatch.key` (a str key as
            is, any other as its `repr`). Turn it off when keys are personal
            data.
        max_links: Most caller spans one batch span links to; the first ones
            applied are kept.
    """

    __slots__ = (
        "_attributes",
        "_conflict_counter",
        "_errors",
        "_failure_counter",
        "_gauges_made",
        "_hist_duration",
        "_hist_load",
        "_hist_save",
        "_hist_size",
        "_lock",
        "_meter",
        "_point_attributes",
        "_max_links",
        "_observed",
        "_record_keys",
        "_span_name",
        "_tracer",
        "_waiting",
        "_withdrawn_counter",
    )

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        attributes: Attributes | None = None,
        span_name: str = "keybatch.batch",
        record_keys: bool = True,
        max_links: int = 128,
    ) -> None:
        if max_links < 0:
            raise ValueError(f"max_links must be >= 0, got {max_links}")
        release = _package_version()
        self._tracer = trace.get_tracer(
            "keybatch", release, tracer_provider=tracer_provider
        )
        meter = metrics.get_meter("keybatch", release, meter_provider=meter_provider)
        self._meter = meter
        self._attributes: dict[str, AttributeValue] = dict(attributes or {})
        self._span_name = span_name
        self._record_keys = record_keys
        self._max_links = max_links
        self._errors = 0
        self._lock = threading.Lock()
        self._observed: tuple[_Observed, ...] = ()
        self._gauges_made = False
        self._waiting: dict[Hashable, dict[tuple[int, int], SpanContext]] = {}
        # Metric attributes per (close_reason, error type), built once each.
        self._point_attributes: dict[tuple[str | None, str | None], Attributes] = {}
        self._hist_size = meter.create_histogram(
            "keybatch.batch.operations",
            unit="{operation}",
            description="Operations per batch.",
            explicit_bucket_boundaries_advisory=SIZE_BUCKETS,
        )
        self._hist_duration = meter.create_histogram(
            "keybatch.batch.duration",
            unit="s",
            description="Batch start to delivery of its outcomes.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self._hist_load = meter.create_histogram(
            "keybatch.batch.load.duration",
            unit="s",
            description="Time in load, per batch.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self._hist_save = meter.create_histogram(
            "keybatch.batch.save.duration",
            unit="s",
            description="Time in save, per batch that saved.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self._failure_counter = meter.create_counter(
            "keybatch.failures",
            unit="{failure}",
            description="Failed loads and saves (batches) and operations that raised.",
        )
        self._conflict_counter = meter.create_counter(
            "keybatch.conflicts",
            unit="{conflict}",
            description="Saves that raised keybatch.Conflict.",
        )
        self._withdrawn_counter = meter.create_counter(
            "keybatch.operations.withdrawn",
            unit="{operation}",
            description="Operations withdrawn by cancelled callers before applied.",
        )

    def __repr__(self) -> str:
        return (
            f"<keybatch.contrib.opentelemetry.BatchTracer {self._span_name!r}"
            f" observing={len(self._observed)} errors={self._errors}>"
        )

    @property
    def errors(self) -> int:
        """Times the hook or a gauge callback failed inside (and logged it)."""
        return self._errors

    # ------------------------------------------------------------------ links

    def traced(
        self, key: Hashable, op: Callable[Concatenate[R, P], T]
    ) -> Callable[Concatenate[R, P], T]:
        """Wrap `op` so that its batch's span links to the caller's span.

        When the wrapped operation is applied, it reads the current span
        (`opentelemetry.trace.get_current_span()`) and keeps its context under
        `key` until this tracer receives the report of that batch. This relies
        on two things keybatch guarantees: each operation runs in a copy of its
        caller's `contextvars` context (so the current span is the caller's),
        and `on_batch` runs after the batch's operations and before any
        operation of the key's next batch is applied. A batch that replays after
        a [`Conflict`][keybatch.Conflict] applies its operations again; each
        caller is linked once. A batch whose load failed applied nothing, so its
        span has no links.

        Args:
            key: The key the operation is run on (the same as given to
                [`run`][keybatch.Processor.run] or
                [`submit`][keybatch.Processor.submit]).
            op: The operation.

        Returns:
            An operation with `op`'s signature and result.
        """
        waiting = self._waiting
        limit = self._max_links

        def traced_op(resource: R, /, *args: P.args, **kwargs: P.kwargs) -> T:
            try:
                context = trace.get_current_span().get_span_context()
                if limit and context.is_valid:
                    ident = (context.trace_id, context.span_id)
                    links = waiting.get(key)
                    if links is None:
                        if len(waiting) < _MAX_KEYS_WAITING:
                            waiting[key] = {ident: context}
                    elif len(links) < limit:
                        links[ident] = context
            except Exception:  # never let tracing fail the operation
                self._failed("capture of the caller's span")
            return op(resource, *args, **kwargs)

        return traced_op

    # ------------------------------------------------------------------- hook

    def __call__(self, report: BatchReport) -> None:
        """Record one batch: the `on_batch` hook. Never raises."""
        try:
            self._record(report)
        except Exception:
            self._failed("on_batch hook")

    def _failed(self, where: str) -> None:
        self._errors += 1
        level = logging.WARNING if self._errors == 1 else logging.DEBUG
        logger.log(level, "keybatch: OpenTelemetry %s failed", where, exc_info=True)

    def _points(self, close_reason: str | None, error_type: str | None) -> Attributes:
        found = self._point_attributes.get((close_reason, error_type))
        if found is None:
            built = dict(self._attributes)
            if close_reason is not None:
                built["keybatch.close_reason"] = close_reason
            if error_type is not None:
                built["error.type"] = error_type
            if len(self._point_attributes) < 256:
                self._point_attributes[(close_reason, error_type)] = built
            found = built
        return found

    def _record(self, report: BatchReport) -> None:
        captured = self._waiting.pop(report.key, None)
        error = report.error
        cause = None if error is None else (error.__cause__ or error)
        error_type = None if cause is None else _type_name(cause)
        kind = None
        if error is not None:
            kind = "load" if isinstance(error, LoadError) else "save"

        # Metrics.
        base = self._attributes
        with_reason = self._points(report.close_reason, None)
        self._hist_size.record(report.operations, with_reason)
        self._hist_duration.record(
            report.duration, self._points(report.close_reason, error_type)
        )
        self._hist_load.record(
            report.load_duration,
            self._points(None, error_type) if kind == "load" else base,
        )
        if report.save_duration is not None:
            self._hist_save.record(
                report.save_duration,
                self._points(None, error_type) if kind == "save" else base,
            )
        if kind is not None:
            self._failure_counter.add(
                1, {**base, "keybatch.failure.kind": kind, "error.type": error_type}
            )
        if report.failed_operations:
            self._failure_counter.add(
                report.failed_operations, {**base, "keybatch.failure.kind": "operation"}
            )
        if report.withdrawn_operations:
            self._withdrawn_counter.add(report.withdrawn_operations, base)
        conflicts = _conflicts(report)
        if conflicts:
            self._conflict_counter.add(conflicts, base)

        # The span.
        duration_ns = int(report.duration * 1e9)
        if report.wall_start > 0:
            start_ns = int(report.wall_start * 1e9)
            end_ns = start_ns + duration_ns
        else:  # a core that does not report wall_start: end now
            end_ns = time.time_ns()
            start_ns = end_ns - duration_ns
        attributes: dict[str, AttributeValue] = dict(base)
        if self._record_keys:
            attributes["keybatch.key"] = _key_text(report.key)
        attributes["keybatch.worker"] = report.worker
        attributes["keybatch.operations"] = report.operations
        attributes["keybatch.operations.failed"] = report.failed_operations
        attributes["keybatch.operations.withdrawn"] = report.withdrawn_operations
        if report.close_reason is not None:
            attributes["keybatch.close_reason"] = report.close_reason
        attributes["keybatch.load.duration"] = report.load_duration
        if report.save_duration is not None:
            attributes["keybatch.save.duration"] = report.save_duration
        attributes["keybatch.replays"] = report.replays
        if kind is not None and error_type is not None:
            attributes["keybatch.failure.kind"] = kind
            attributes["error.type"] = error_type
            if isinstance(error, SaveError):
                attributes["keybatch.save.may_have_landed"] = error.may_have_landed
        links = None
        if captured:
            links = [Link(context) for context in captured.values()]
        span = self._tracer.start_span(
            self._span_name,
            context=_ROOT,
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            links=links,
            start_time=start_ns,
        )
        if error is not None and span.is_recording():
            span.set_status(Status(StatusCode.ERROR, str(error)))
            span.record_exception(error, timestamp=end_ns)
        span.end(end_time=end_ns)

    # ----------------------------------------------------------------- gauges

    def observe(
        self, processor: Processor[Any], *, attributes: Attributes | None = None
    ) -> None:
        """Report `processor`'s queues as observable gauges.

        Each collection reads [`statistics()`][keybatch.Processor.statistics]
        and reports `keybatch.worker_queue.max` (`max_worker_queue`, the main
        operating signal), `keybatch.operations.pending`, `keybatch.keys`,
        `keybatch.batches.active` and `keybatch.exclusive_sections`. The
        callbacks run wherever the metric reader collects (a
        `PeriodicExportingMetricReader` uses its own thread): they only read
        counters, and a failure is logged, never raised.

        A processor that has stopped (stopping, with no key, pending operation
        or batch left) is reported once more with its zeros, then forgotten.
        Observing the same processor again replaces its attributes.

        Args:
            processor: The processor to watch.
            attributes: Its points' attributes. Default: the tracer's
                `attributes`. Give each processor distinct ones when a tracer
                observes several.
        """
        chosen = dict(self._attributes if attributes is None else attributes)
        with self._lock:
            if not self._gauges_made:
                for name, field, unit, description in _GAUGES:
                    self._meter.create_observable_gauge(
                        name,
                        callbacks=[self._gauge_callback(name, field)],
                        unit=unit,
                        description=description,
                    )
                self._gauges_made = True
            kept = tuple(o for o in self._observed if o.processor is not processor)
            self._observed = (*kept, _Observed(processor, chosen))

    def unobserve(self, processor: Processor[Any]) -> None:
        """Stop reporting `processor`'s gauges (nothing happens if not observed)."""
        with self._lock:
            self._observed = tuple(
                o for o in self._observed if o.processor is not processor
            )

    def _gauge_callback(
        self, name: str, field: str
    ) -> Callable[[metrics.CallbackOptions], Iterable[metrics.Observation]]:
        def callback(options: metrics.CallbackOptions) -> list[metrics.Observation]:
            found: list[metrics.Observation] = []
            for observed in self._observed:
                try:
                    stats = observed.statistics(name)
                    found.append(
                        metrics.Observation(getattr(stats, field), observed.attributes)
                    )
                    if _finished(stats):
                        self._forget_finished(observed, name)
                except Exception:
                    self._failed(f"gauge {name}")
            return found

        return callback

    def _forget_finished(self, observed: _Observed, gauge: str) -> None:
        observed.finished_in.add(gauge)
        if len(observed.finished_in) == len(_GAUGES):
            with self._lock:
                self._observed = tuple(o for o in self._observed if o is not observed)
