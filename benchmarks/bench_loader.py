"""keybatch.loader against aiodataloader on asyncio: microseconds per load.

The workload of issue 10: 10,000 loads over 1,000 ids. ``callers`` long-lived
tasks each await ``load(id)`` in a loop, 10,000 loads in all; caller ``c``'s
``j``-th load asks for id ``(c + j * callers) % 1000``, so each round of the
callers' loads is one window and every id is asked for ten times. ``batch_load``
is in memory (it does not wait), so the figures are the batcher's own cost. In
the same run, in the same process, on asyncio (aiodataloader runs on asyncio
only), with the cache off and on:

- ``keybatch``: ``keybatch.loader.open_loader(batch_load, cache=...)``, other
  options default (``max_wait=0``);
- ``aiodataloader``: ``aiodataloader.DataLoader(batch_load, cache=...)``.

Each figure is the best (lowest) of a few interleaved repetitions; ``us/load``
is the CPU time of the process per load, ``wall`` the wall-clock time per load.
Run: ``python -m benchmarks.bench_loader [--tiny | --full]``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from keybatch.loader import open_loader

from ._common import now, parse_args, print_header, print_table, run_on, write_json

CALLERS = {
    "tiny": [10],
    "quick": [10, 100, 1000],
    "full": [1, 10, 100, 1000],
}
TOTAL_LOADS = {"tiny": 300, "quick": 10_000, "full": 10_000}
IDS = 1000
REPEATS = {"tiny": 1, "quick": 5, "full": 9}
IMPLS = ("keybatch", "aiodataloader")


async def measure(
    impl: str, callers: int, per_caller: int, cache: bool
) -> tuple[float, float, int]:
    """Wall and CPU seconds for ``callers`` tasks to await ``per_caller`` loads
    each, and the number of batch_load calls."""
    batches = 0

    async def batch_load_mapping(ids: list[int]) -> dict[int, int]:
        nonlocal batches
        batches += 1
        return {i: 2 * i for i in ids}

    async def batch_load_list(ids: list[int]) -> list[int]:
        nonlocal batches
        batches += 1
        return [2 * i for i in ids]

    total = 0
    arrived = 0
    ready = anyio.Event()
    gate = anyio.Event()

    async def drive(load: Callable[[int], Awaitable[Any]]) -> tuple[float, float]:
        async def caller(c: int) -> None:
            nonlocal arrived, total
            arrived += 1
            if arrived == callers:
                ready.set()
            await gate.wait()
            got = 0
            for j in range(per_caller):
                got += await load((c + j * callers) % IDS)
            total += got

        async with anyio.create_task_group() as tg:
            for c in range(callers):
                tg.start_soon(caller, c)
            await ready.wait()
            started, started_cpu = now(), time.process_time()
            gate.set()
        return now() - started, time.process_time() - started_cpu

    if impl == "keybatch":
        async with open_loader(batch_load_mapping, cache=cache) as loader:
            wall, cpu = await drive(loader.load)
    else:
        from aiodataloader import DataLoader

        dataloader: Any = DataLoader(batch_load_list, cache=cache)
        wall, cpu = await drive(dataloader.load)
    expected = sum(
        2 * ((c + j * callers) % IDS) for c in range(callers) for j in range(per_caller)
    )
    if total != expected:  # the benchmark must not lie
        raise AssertionError(f"{impl}: wrong values")
    return wall, cpu, batches


def run_cell(callers: int, cache: bool, mode: str) -> dict[str, float]:
    per_caller = max(1, TOTAL_LOADS[mode] // callers)
    n = callers * per_caller
    best: dict[str, float] = {}
    for _ in range(REPEATS[mode]):
        for impl in IMPLS:  # interleaved, so drift hits both
            wall, cpu, batches = run_on(
                "asyncio", measure, impl, callers, per_caller, cache
            )
            best[impl] = min(best.get(impl, float("inf")), cpu / n * 1e6)
            best[f"{impl}_wall"] = min(
                best.get(f"{impl}_wall", float("inf")), wall / n * 1e6
            )
            best[f"{impl}_batches"] = batches
    return best


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(__doc__.splitlines()[0], argv, backends=False)
    print_header("loader against aiodataloader, asyncio, in-memory batch_load", args)
    print(
        f"   {TOTAL_LOADS[args.mode]} loads over {IDS} ids; us/load = CPU time per"
        f" load (best of {REPEATS[args.mode]}); wall = wall-clock time per load;"
        " ratio = keybatch / aiodataloader"
    )
    results = []
    rows = []
    totals = {"keybatch": 0.0, "aiodataloader": 0.0}
    for cache in (False, True):
        for callers in CALLERS[args.mode]:
            r = run_cell(callers, cache, args.mode)
            results.append({"callers": callers, "cache": cache, **r})
            totals["keybatch"] += r["keybatch"]
            totals["aiodataloader"] += r["aiodataloader"]
            rows.append(
                [
                    "on" if cache else "off",
                    callers,
                    r["keybatch_batches"],
                    r["aiodataloader_batches"],
                    r["keybatch"],
                    r["aiodataloader"],
                    r["keybatch"] / r["aiodataloader"],
                    r["keybatch_wall"] / r["aiodataloader_wall"],
                ]
            )
    print_table(
        [
            "cache",
            "callers",
            "keybatch calls",
            "aiodataloader calls",
            "keybatch us/load",
            "aiodataloader us/load",
            "ratio",
            "wall ratio",
        ],
        rows,
    )
    print(
        "   all cells: keybatch / aiodataloader CPU time ="
        f" {totals['keybatch'] / totals['aiodataloader']:.2f}"
    )
    write_json(args.json, "loader", args, results)
    return results


if __name__ == "__main__":
    main()
