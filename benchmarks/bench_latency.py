"""Latency of ``run`` under load, against min_duration + load + save.

Callers (each awaiting ``run`` in a loop, for a fixed time) share a few keys;
load and save each wait a fixed time (simulated I/O: the event loop's sleep).
A call that arrives while its key's batch is saving waits for that save, then a
whole batch of its own, so the time a batch needs, ``min_duration + load +
save``, is the yardstick: every latency is printed next to it, as a ratio. The
batch's window counts from its start (load included), so a closed-loop caller
typically waits ``max(min_duration, load) + save``: ratios below 1 are expected
when load > 0. There is no deadline (``max_duration=math.inf``): a slow
machine makes batches late, and that is what is measured, not timeouts.

Run: ``python -m benchmarks.bench_latency [--tiny | --full] [--backend ...]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import anyio

import keybatch

from ._common import (
    add,
    now,
    parse_args,
    percentile,
    print_header,
    print_table,
    run_on,
    write_json,
)

MS = 0.001
# (callers, keys, min_duration, load = save seconds) per mode.
GRIDS: dict[str, list[tuple[int, int, float, float]]] = {
    "tiny": [(10, 2, 0.0, 1 * MS), (10, 2, 5 * MS, 1 * MS)],
    "quick": [
        (c, 10, md, 1 * MS) for c in (100, 1000) for md in (0.0, 10 * MS, 100 * MS)
    ],
    "full": [
        (c, k, md, io)
        for c in (100, 1000, 10000)
        for k in (10, 1000)
        for md in (0.0, 10 * MS, 100 * MS)
        for io in (1 * MS, 10 * MS)
    ],
}
SECONDS = {"tiny": 0.1, "quick": 1.0, "full": 5.0}
BATCHES = {"tiny": 3, "quick": 15, "full": 40}  # at least this many batches per key


async def latencies(
    callers: int, nkeys: int, min_duration: float, io: float, seconds: float
) -> tuple[list[float], float]:
    """Latency of every call, and the wall seconds the run took."""
    keys = [f"key-{i}" for i in range(nkeys)]
    store: dict[str, list[int]] = {}

    async def load(key: str) -> list[int]:
        await anyio.sleep(io)
        return store.get(key) or [0]

    async def save(key: str, resource: list[int]) -> None:
        await anyio.sleep(io)
        store[key] = resource

    samples: list[float] = []
    async with keybatch.open_processor(
        load=load, save=save, min_duration=min_duration, max_duration=math.inf
    ) as proc:
        start = now()
        end = start + seconds

        async def caller(i: int) -> None:
            key = keys[i % nkeys]
            while True:
                began = now()
                if began >= end:
                    return
                await proc.run(key, add, 1)
                samples.append(now() - began)

        async with anyio.create_task_group() as tg:
            for i in range(callers):
                tg.start_soon(caller, i)
        elapsed = now() - start
    if sum(r[0] for r in store.values()) != len(samples):
        raise AssertionError("lost operations")
    return samples, elapsed


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(__doc__.splitlines()[0], argv)
    print_header("latency of run under load", args)
    print("   ms; x = latency / (min_duration + load + save)")
    rows = []
    results: list[dict[str, Any]] = []
    for callers, nkeys, md, io in GRIDS[args.mode]:
        batch = md + 2 * io
        seconds = max(SECONDS[args.mode], BATCHES[args.mode] * batch)
        for backend in args.backends:
            samples, elapsed = run_on(
                backend, latencies, callers, nkeys, md, io, seconds
            )
            samples.sort()
            p50, p99, top = (
                percentile(samples, 50),
                percentile(samples, 99),
                samples[-1],
            )
            rows.append(
                [
                    backend,
                    callers,
                    nkeys,
                    f"{md * 1000:g}",
                    f"{io * 1000:g}",
                    batch * 1000,
                    p50 * 1000,
                    p50 / batch,
                    p99 * 1000,
                    p99 / batch,
                    top * 1000,
                    top / batch,
                    len(samples) / elapsed,
                ]
            )
            results.append(
                {
                    "backend": backend,
                    "callers": callers,
                    "keys": nkeys,
                    "min_duration": md,
                    "load": io,
                    "save": io,
                    "p50": p50,
                    "p99": p99,
                    "max": top,
                    "operations": len(samples),
                    "ops_per_s": len(samples) / elapsed,
                }
            )
    print_table(
        [
            "loop",
            "callers",
            "keys",
            "min ms",
            "load=save ms",
            "min+load+save",
            "p50",
            "x",
            "p99",
            "x",
            "max",
            "x",
            "ops/s",
        ],
        rows,
    )
    write_json(args.json, "latency", args, results)
    return results


if __name__ == "__main__":
    main()
