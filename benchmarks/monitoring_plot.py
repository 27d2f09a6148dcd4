"""Draw what a monitoring dashboard shows, from a real run (docs/monitoring.md).

``python -m benchmarks.monitoring_plot [--out docs/img/monitoring_dashboard.png]
[--seconds 38] [--clock virtual|wall] [--backend trio|asyncio]`` (needs the
``bench`` and ``prometheus`` extras).

One processor runs for ``--seconds`` on a simulated store
(loads and saves are sleeps of a few milliseconds) under a load ramp, and the
store turns slow for a while: saves take 4x longer and 1% of them hang past the
batch deadline. Every 0.5 s the script scrapes a Prometheus registry fed by
``keybatch.contrib.prometheus`` (the collector and the
histogram hook, exactly as an application would wire them) and computes what the
dashboard's queries would: rates of the counters, the mean batch size, quantiles
of the histograms (interpolated in their buckets, as PromQL's
``histogram_quantile`` does), and the gauges as they are. It prints a summary per
phase and writes the figure.

The clock is virtual by default (trio's ``MockClock``, autojumping): the processor,
the hooks and the scrapes run for real, but time passes only in the store's
sleeps and the processor's windows, so other work on the machine adds no noise
and a run is reproducible. ``--clock wall`` runs on the real clock instead (then
the run takes ``--seconds`` and the machine's load shows in it).
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from prometheus_client import CollectorRegistry

import keybatch
from keybatch.contrib.prometheus import BatchHistograms, StatisticsCollector

NAME = "accounts"
SCRAPE = 0.5  # seconds between scrapes
WINDOW = 2.0  # seconds of history in rates and quantiles (PromQL's [2s])

# The workload, in fractions of the run.
RAMP = (0.05, 0.45)  # offered rate goes from LOW to HIGH
SLOW = (0.58, 0.76)  # the store is slow
LOW, HIGH = 400.0, 5000.0  # operations per second offered
KEYS = 200
WORKERS = 16
LOAD_S, SAVE_S = 0.002, 0.004  # typical store latencies
SLOW_FACTOR = 4.0
HANG_P, HANG_S = 0.01, 0.5  # in the slow phase, saves that hang past the deadline


@dataclass
class Scrape:
    t: float
    offered: int
    rejected: int
    values: dict[str, float]
    buckets: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


class Store:
    """Sleeps like a database; slow between the SLOW marks."""

    def __init__(self, seconds: float, started: float, rng: random.Random) -> None:
        self.slow_from = started + SLOW[0] * seconds
        self.slow_to = started + SLOW[1] * seconds
        self.rng = rng

    def slow(self) -> bool:
        return self.slow_from <= anyio.current_time() < self.slow_to

    async def load(self, key: str) -> list[int]:
        await anyio.sleep(LOAD_S * self.rng.lognormvariate(0, 0.3))
        return []

    async def save(self, key: str, resource: list[int]) -> None:
        delay = SAVE_S * self.rng.lognormvariate(0, 0.3)
        if self.slow():
            delay *= SLOW_FACTOR
            if self.rng.random() < HANG_P:
                delay = HANG_S
        await anyio.sleep(delay)


def append(resource: list[int], n: int) -> None:
    resource.append(n)


def offered_rate(fraction: float) -> float:
    start, end = RAMP
    if fraction <= start:
        return LOW
    if fraction >= end:
        return HIGH
    return LOW + (HIGH - LOW) * (fraction - start) / (end - start)


def read(registry: CollectorRegistry) -> tuple[dict[str, float], dict[str, Any]]:
    """Sample values by name (label processor=NAME summed), and bucket lists."""
    values: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.labels.get("processor") != NAME:
                continue
            name = sample.name
            if "kind" in sample.labels:
                name = f"{name}:{sample.labels['kind']}"
            if name.endswith("_bucket"):
                le = float(sample.labels["le"])
                per = buckets.setdefault(name[: -len("_bucket")], {})
                per[le] = per.get(le, 0.0) + sample.value
            else:
                values[name] = values.get(name, 0.0) + sample.value
    return values, {k: sorted(v.items()) for k, v in buckets.items()}


def quantile(q: float, now: Sequence[tuple[float, float]], then: Any) -> float:
    """PromQL's histogram_quantile over the increase of cumulative buckets."""
    before = dict(then or [])
    counts = [(le, c - before.get(le, 0.0)) for le, c in now]
    total = counts[-1][1] if counts else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for le, c in counts:
        if c >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / max(c - below, 1e-12)
        lower, below = le, c
    return lower


async def workload(seconds: float, seed: int) -> list[Scrape]:
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** 1.1 for i in range(KEYS)]
    keys = [f"account:{i}" for i in range(KEYS)]
    registry = CollectorRegistry()
    collector = StatisticsCollector(registry)
    histograms = BatchHistograms(registry)
    started = anyio.current_time()
    store = Store(seconds, started, rng)
    scrapes: list[Scrape] = []
    offered = rejected = 0
    async with keybatch.open_processor(
        load=store.load,
        save=store.save,
        min_duration=0.05,
        max_duration=0.25,
        workers=WORKERS,
        max_ops=1000,
        max_pending=20_000,
        on_batch=histograms.hook(NAME),
    ) as processor:
        collector.observe(processor, NAME)

        async def scraper() -> None:
            while True:
                values, buckets = read(registry)
                scrapes.append(
                    Scrape(
                        anyio.current_time() - started,
                        offered,
                        rejected,
                        values,
                        buckets,
                    )
                )
                await anyio.sleep(SCRAPE)

        async with anyio.create_task_group() as tg:
            tg.start_soon(scraper)
            tick, carry, last = 0.005, 0.0, 0.0
            while (elapsed := anyio.current_time() - started) < seconds:
                carry += offered_rate(elapsed / seconds) * (elapsed - last)
                last = elapsed
                n, carry = int(carry), carry - int(carry)
                for key in rng.choices(keys, weights, k=n):
                    offered += 1
                    try:
                        processor.submit(key, append, offered)
                    except keybatch.Overloaded:
                        rejected += 1
                await anyio.sleep(tick)
            await processor.flush()
            tg.cancel_scope.cancel()
    return scrapes


@dataclass
class Series:
    t: list[float] = field(default_factory=list)
    offered: list[float] = field(default_factory=list)
    done: list[float] = field(default_factory=list)
    rejected: list[float] = field(default_factory=list)
    batch_mean: list[float] = field(default_factory=list)
    batch_p99: list[float] = field(default_factory=list)
    max_queue: list[float] = field(default_factory=list)
    pending: list[float] = field(default_factory=list)
    save_p99: list[float] = field(default_factory=list)
    save_p50: list[float] = field(default_factory=list)
    load_p99: list[float] = field(default_factory=list)
    save_failures: list[float] = field(default_factory=list)


def derive(scrapes: list[Scrape]) -> Series:
    """What the dashboard's queries give at each scrape (rates over WINDOW)."""
    s = Series()
    lag = max(1, round(WINDOW / SCRAPE))
    for i in range(lag, len(scrapes)):
        now, then = scrapes[i], scrapes[i - lag]
        dt = now.t - then.t
        v, w = now.values, then.values

        def rate(name: str, v: dict[str, float] = v, w: dict[str, float] = w) -> float:
            return (v.get(name, 0.0) - w.get(name, 0.0)) / dt  # noqa: B023

        s.t.append(now.t)
        s.offered.append((now.offered - then.offered) / dt)
        s.rejected.append((now.rejected - then.rejected) / dt)
        s.done.append(rate("keybatch_operations_total"))
        batches = rate("keybatch_batch_operations_count")
        s.batch_mean.append(
            rate("keybatch_batch_operations_sum") / batches if batches else math.nan
        )
        s.batch_p99.append(
            quantile(
                0.99,
                now.buckets.get("keybatch_batch_operations", []),
                then.buckets.get("keybatch_batch_operations"),
            )
        )
        s.max_queue.append(v.get("keybatch_max_worker_queue", 0.0))
        s.pending.append(v.get("keybatch_pending_operations", 0.0))
        for q, target in ((0.99, s.save_p99), (0.5, s.save_p50)):
            target.append(
                1000
                * quantile(
                    q,
                    now.buckets.get("keybatch_batch_save_duration_seconds", []),
                    then.buckets.get("keybatch_batch_save_duration_seconds"),
                )
            )
        s.load_p99.append(
            1000
            * quantile(
                0.99,
                now.buckets.get("keybatch_batch_load_duration_seconds", []),
                then.buckets.get("keybatch_batch_load_duration_seconds"),
            )
        )
        s.save_failures.append(rate("keybatch_failures_total:save"))
    return s


def summary(s: Series, seconds: float) -> None:
    phases = [
        ("low load", 0.0, RAMP[0]),
        ("ramp", RAMP[0], RAMP[1]),
        ("high load", RAMP[1], SLOW[0]),
        ("slow store", SLOW[0], SLOW[1]),
        ("recovery", SLOW[1], 1.0),
    ]
    print(
        f"{'phase':<11} {'offered/s':>9} {'done/s':>8} {'ops/batch':>9} "
        f"{'max queue':>9} {'pending':>8} {'save p99 ms':>11} {'save fail/s':>11}"
    )
    for name, a, b in phases:
        idx = [i for i, t in enumerate(s.t) if a * seconds <= t < b * seconds]
        if not idx:
            continue

        def mean(xs: list[float], idx: list[int] = idx) -> float:
            vals = [xs[i] for i in idx if not math.isnan(xs[i])]
            return sum(vals) / len(vals) if vals else math.nan

        def peak(xs: list[float], idx: list[int] = idx) -> float:
            vals = [xs[i] for i in idx if not math.isnan(xs[i])]
            return max(vals) if vals else math.nan

        print(
            f"{name:<11} {mean(s.offered):9.0f} {mean(s.done):8.0f} "
            f"{mean(s.batch_mean):9.1f} {peak(s.max_queue):9.0f} "
            f"{peak(s.pending):8.0f} {peak(s.save_p99):11.1f} "
            f"{mean(s.save_failures):11.2f}"
        )


def plot(s: Series, seconds: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(5, 1, figsize=(9, 11.5), sharex=True)
    slow = (SLOW[0] * seconds, SLOW[1] * seconds)
    panels = [
        (
            "Throughput (operations/s)",
            [
                (s.offered, "offered", "0.6", "--"),
                (s.done, "rate(keybatch_operations_total)", "C0", "-"),
            ],
        ),
        (
            "Batch size (operations)",
            [
                (s.batch_mean, "mean: rate(_sum) / rate(_count)", "C0", "-"),
                (s.batch_p99, "p99", "C1", "-"),
            ],
        ),
        (
            "Queues (operations)",
            [
                (s.max_queue, "keybatch_max_worker_queue", "C3", "-"),
                (s.pending, "keybatch_pending_operations", "C0", "-"),
            ],
        ),
        (
            "Save and load duration (ms)",
            [
                (s.save_p99, "save p99", "C3", "-"),
                (s.save_p50, "save p50", "C1", "-"),
                (s.load_p99, "load p99", "C0", "-"),
            ],
        ),
        (
            "Failed saves (batches/s)",
            [
                (
                    s.save_failures,
                    'rate(keybatch_failures_total{kind="save"})',
                    "C3",
                    "-",
                )
            ],
        ),
    ]
    for ax, (title, lines) in zip(axes, panels, strict=True):
        ax.axvspan(*slow, color="C3", alpha=0.08, lw=0)
        for ys, label, color, style in lines:
            ax.plot(s.t, ys, style, color=color, label=label, lw=1.6)
        ax.set_title(title, loc="left", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8, frameon=False)
    for ax in axes[1:4]:
        ax.set_yscale("log")
    axes[0].set_ylim(bottom=0)
    axes[1].set_ylim(bottom=1)
    axes[2].set_ylim(bottom=1)
    axes[3].set_ylim(1, 1000)
    axes[4].set_ylim(bottom=0)
    axes[3].axhline(250, color="0.4", lw=0.8, ls=":")
    axes[3].annotate(
        "deadline: max_duration 250 ms",
        (s.t[-1], 250),
        xytext=(0, 3),
        textcoords="offset points",
        fontsize=8,
        color="0.3",
        ha="right",
    )
    axes[0].annotate(
        f"store slow: saves {SLOW_FACTOR:g}x, {HANG_P:.0%} hang",
        (slow[0], 0),
        xytext=(4, 4),
        textcoords="offset points",
        fontsize=8,
        color="C3",
        xycoords=("data", "axes fraction"),
    )
    axes[-1].set_xlabel("seconds")
    fig.suptitle(
        f"One processor, {WORKERS} workers, {KEYS} keys (Zipf), min_duration 50 ms:"
        " a load ramp, then a slow store",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/img/monitoring_dashboard.png")
    parser.add_argument("--seconds", type=float, default=38.0)
    parser.add_argument("--backend", choices=["trio", "asyncio"], default="trio")
    parser.add_argument("--clock", choices=["virtual", "wall"], default="virtual")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--slow-factor", type=float, default=SLOW_FACTOR)
    parser.add_argument("--hang", type=float, default=HANG_P, help="hung saves' share")
    args = parser.parse_args(argv)
    globals().update(SLOW_FACTOR=args.slow_factor, HANG_P=args.hang)
    options: dict[str, Any] = {}
    if args.clock == "virtual":
        if args.backend != "trio":
            parser.error("--clock virtual needs --backend trio")
        import trio.testing

        options["clock"] = trio.testing.MockClock(autojump_threshold=0)
    scrapes = anyio.run(
        workload,
        args.seconds,
        args.seed,
        backend=args.backend,
        backend_options=options,
    )
    series = derive(scrapes)
    summary(series, args.seconds)
    plot(series, args.seconds, args.out)


if __name__ == "__main__":
    main()
