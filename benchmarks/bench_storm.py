"""A cancellation storm on one hot key: how late does an unrelated task run?

Issue 8, fault 11: on asyncio, every caller of a batch parked on one shared
future, so one caller's cancellation cancelled that future and woke every other
caller of the batch, which parked again: each cancellation cost O(callers), and
a storm of client timeouts stalled the whole event loop.

The workload: one processor, ``min_duration`` 2 s (a long window), and 8,000
callers awaiting ``run`` on the same key. Half of them have a client timeout.
Once every caller is parked (spawning 8,000 tasks takes a few hundred ms, and
is not what is measured), the timeouts are armed, staggered evenly over 5% to 90%
of what is left of the window, so about 4,000 cancellations arrive while the
batch's window is open, a few every millisecond; the other half wait for the
batch. Beside them, an unrelated ticker task sleeps 1 ms in a loop and records
how late it wakes (actual sleep minus 1 ms): that lateness is what every other
key's batch and every other task on the loop would suffer. The ticker also runs
alone for a moment first (the idle figure), in the same loop. Each caller that
timed out also records how long after its deadline it saw the timeout.

Timeouts are the loop's own (a ``trio.CancelScope``, ``asyncio.timeout`` on
Python 3.11+) and anyio's (an ``anyio.CancelScope``, as ``move_on_after``
makes), which cancels differently on asyncio (it re-delivers the cancellation
until the task leaves the scope). This
is real time: a benchmark, not a test; the machine's other work shows in the max.

Run: ``python -m benchmarks.bench_storm [--tiny | --full] [--backend ...]``.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import anyio
import trio

import keybatch

from ._common import (
    LOOPS,
    parse_args,
    percentile,
    print_header,
    print_table,
    write_json,
)

CALLERS = {"tiny": 200, "quick": 8000, "full": 8000}
WINDOW = {"tiny": 0.1, "quick": 2.0, "full": 2.0}
RUNS = {"tiny": 1, "quick": 2, "full": 5}
TICK = 0.001
IDLE = 0.2  # seconds of ticking alone before the storm


def bump(resource: dict[str, int]) -> int:
    resource["n"] += 1
    return resource["n"]


def timeouts_for(loop: str) -> list[str]:
    """The ways of timing a caller out on ``loop``."""
    if loop == "trio":
        return ["trio.CancelScope", "anyio.CancelScope"]
    native = ["asyncio.timeout"] if sys.version_info >= (3, 11) else []
    return [*native, "anyio.CancelScope"]


async def storm(loop: str, how: str, callers: int, window: float) -> dict[str, Any]:
    """One storm; the ticker's lateness idle and during the storm (ms)."""
    sleep = trio.sleep if loop == "trio" else asyncio.sleep

    async def load(key: str) -> dict[str, int]:
        return {"n": 0}

    async def save(key: str, resource: dict[str, int]) -> None:
        pass

    ticks: list[tuple[float, float]] = []  # (woke at, lateness)
    ticking = True
    counts = {"started": 0, "done": 0, "timed_out": 0, "overran": 0}
    timeout_late: list[float] = []  # how late each caller saw its timeout
    all_started = anyio.Event()
    # Each timed caller's scope, its place in the stagger, and (once set) its
    # deadline on the perf_counter clock.
    timers: list[list[Any]] = []

    async def ticker() -> None:
        while ticking:
            began = time.perf_counter()
            await sleep(TICK)
            woke = time.perf_counter()
            ticks.append((woke, woke - began - TICK))

    async def caller(proc: Any, stagger: float | None) -> None:
        counts["started"] += 1
        if counts["started"] == callers:
            all_started.set()
        if stagger is None:
            await proc.run("hot", bump)
            counts["done"] += 1
            return
        # No deadline yet: it is set once every caller is parked (below).
        timer: list[Any] = [None, stagger, math.inf]
        timers.append(timer)
        timed_out = False
        if how == "asyncio.timeout":
            try:
                async with asyncio.timeout(None) as timer[0]:  # type: ignore[attr-defined]
                    await proc.run("hot", bump)
            except TimeoutError:
                timed_out = True
        else:
            native = how == "trio.CancelScope"
            with (trio.CancelScope if native else anyio.CancelScope)() as timer[0]:
                await proc.run("hot", bump)
            timed_out = timer[0].cancelled_caught
        late = time.perf_counter() - timer[2]
        if timed_out:
            counts["timed_out"] += 1
            timeout_late.append(late)
        else:
            counts["done"] += 1
            if late > 0:  # its deadline had passed, yet the result came first
                counts["overran"] += 1

    def arm(span: float) -> None:
        """Give every timed caller its deadline, staggered over ``span`` seconds."""
        wall = time.perf_counter()
        if loop == "trio":
            clock = trio.current_time()
        else:
            clock = asyncio.get_running_loop().time()
        for timer in timers:
            offset = span * timer[1]
            timer[2] = wall + offset
            if how == "asyncio.timeout":
                timer[0].reschedule(clock + offset)
            else:
                timer[0].deadline = clock + offset

    async with (
        keybatch.open_processor(load=load, save=save, min_duration=window) as proc,
        anyio.create_task_group() as outer,
    ):
        outer.start_soon(ticker)
        await anyio.sleep(IDLE)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        async with anyio.create_task_group() as tg:
            for index in range(callers):
                stagger = None
                if index % 2 == 0:  # half of them time out, staggered
                    stagger = 0.05 + 0.85 * index / callers
                tg.start_soon(caller, proc, stagger)
            await all_started.wait()
            parked = time.perf_counter()
            # The window opened with the first caller: stagger the timeouts over
            # what is left of it.
            arm(max(0.0, wall0 + window - parked))
            armed = time.perf_counter()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        ticking = False
    # Phases by when the ticker woke: idle (before the storm); the window (every
    # caller parked, timeouts firing, until the window closes); the whole storm
    # (spawning the callers and delivering the batch included).
    idle = sorted(late for woke, late in ticks if woke < wall0)
    whole = sorted(late for woke, late in ticks if woke >= wall0)
    during = sorted(late for woke, late in ticks if armed <= woke < wall0 + window)
    timeout_late.sort()
    nan = float("nan")
    # A stalled loop yields few, very late ticks, so the median tick hides it;
    # the share of the phase spent late does not.
    phase = wall0 + window - armed
    stalled = sum(during) / phase if phase > 0 else nan

    def ms(values: list[float], q: float) -> float:
        return percentile(values, q) * 1e3 if values else nan

    return {
        "loop": loop,
        "timeout": how,
        "callers": callers,
        "window": window,
        "timed_out": counts["timed_out"],
        "done": counts["done"],
        "overran": counts["overran"],
        "spawn_s": parked - wall0,
        "timed_span_s": wall0 + window - parked,
        "storm_wall_s": wall,
        "storm_cpu_s": cpu,
        "idle_median_ms": ms(idle, 50),
        "idle_max_ms": ms(idle, 100),
        "median_ms": ms(during, 50),
        "p99_ms": ms(during, 99),
        "max_ms": ms(during, 100),
        "ticks": len(during),
        "stalled": stalled,
        "storm_max_ms": ms(whole, 100),
        "timeout_late_median_ms": ms(timeout_late, 50),
        "timeout_late_max_ms": ms(timeout_late, 100),
    }


def run_storm(loop: str, how: str, callers: int, window: float) -> dict[str, Any]:
    from .floor import run_loop

    return dict(run_loop(loop, storm, loop, how, callers, window))


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(__doc__.splitlines()[0], argv, loops=LOOPS, default="all")
    callers, window, runs = CALLERS[args.mode], WINDOW[args.mode], RUNS[args.mode]
    print_header(
        f"cancellation storm: {callers:,} callers on one key, {window:g} s window,"
        f" half of them timing out",
        args,
    )
    print(
        "   lateness of a 1 ms ticker (ms): idle (alone, before the storm); window"
        " (all callers parked, timeouts firing, until the window closes): p50, p99,"
        " max, ticks seen, stalled = the sum of the lateness over the phase's"
        " length; storm max (spawning and delivery included)."
        " timeout late: how long after its deadline a caller saw its timeout (ms);"
        " overran: callers whose deadline passed but whose result came first."
        f" {runs} run(s) per row"
    )
    results: list[dict[str, Any]] = []
    rows = []
    for loop in args.backends:
        for how in timeouts_for(loop):
            for _ in range(runs):
                r = run_storm(loop, how, callers, window)
                results.append(r)
                rows.append(
                    [
                        loop,
                        how,
                        r["timed_out"],
                        r["done"],
                        r["overran"],
                        r["idle_median_ms"],
                        r["idle_max_ms"],
                        r["median_ms"],
                        r["p99_ms"],
                        r["max_ms"],
                        r["ticks"],
                        f"{r['stalled'] * 100:.0f}%",
                        r["storm_max_ms"],
                        r["timeout_late_median_ms"],
                        r["timeout_late_max_ms"],
                        r["storm_cpu_s"],
                    ]
                )
    print_table(
        [
            "loop",
            "timeout",
            "timed out",
            "done",
            "overran",
            "idle p50",
            "idle max",
            "window p50",
            "p99",
            "max",
            "ticks",
            "stalled",
            "storm max",
            "timeout late p50",
            "max",
            "CPU s",
        ],
        rows,
    )
    write_json(args.json, "storm", args, results)
    return results


if __name__ == "__main__":
    main()
