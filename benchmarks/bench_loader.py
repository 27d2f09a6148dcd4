"""keybatch.loader against aiodataloader on asyncio: microseconds per load.

Long-lived callers each await ``load(id)`` in a loop, every id distinct, so that
each round of the callers' loads is one batch. ``batch_load`` is in memory (it
does not wait), so the figures are the batcher's own cost. In the same run, in
the same process, on asyncio (aiodataloader runs on asyncio only):

- ``keybatch``: ``keybatch.loader.open_loader(batch_load)``, default options
  (``max_wait=0``, no cache);
- ``aiodataloader``: ``aiodataloader.DataLoader(batch_load, cache=False)``.

Each figure is the best (lowest) of a few interleaved repetitions; ``us/load`` is
the CPU time of the process per load, ``wall`` the wall-clock time per load.
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
    "full": [1, 10, 100, 1000, 10000],
}
TOTAL_LOADS = {"tiny": 300, "quick": 30000, "full": 200000}
REPEATS = {"tiny": 1, "quick": 3, "full": 5}
IMPLS = ("keybatch", "aiodataloader")


async def measure(impl: str, callers: int, per_caller: int) -> tuple[float, float, int]:
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
                got += await load(c + j * callers)
            total += got

        async with anyio.create_task_group() as tg:
            for c in range(callers):
                tg.start_soon(caller, c)
            await ready.wait()
            started, started_cpu = now(), time.process_time()
            gate.set()
        return now() - started, time.process_time() - started_cpu

    if impl == "keybatch":
        async with open_loader(batch_load_mapping) as loader:
            wall, cpu = await drive(loader.load)
    else:
        from aiodataloader import DataLoader

        dataloader: Any = DataLoader(batch_load_list, cache=False)
        wall, cpu = await drive(dataloader.load)
    n = callers * per_caller
    if total != 2 * sum(range(n)):  # the benchmark must not lie
        raise AssertionError(f"{impl}: wrong values")
    return wall, cpu, batches


def run_cell(callers: int, mode: str) -> dict[str, float]:
    per_caller = max(1, TOTAL_LOADS[mode] // callers)
    n = callers * per_caller
    best: dict[str, float] = {}
    for _ in range(REPEATS[mode]):
        for impl in IMPLS:  # interleaved, so drift hits both
            wall, cpu, batches = run_on("asyncio", measure, impl, callers, per_caller)
            best[impl] = min(best.get(impl, float("inf")), cpu / n * 1e6)
            best[f"{impl}_wall"] = min(
                best.get(f"{impl}_wall", float("inf")), wall / n * 1e6
            )
            best[f"{impl}_batch"] = n / batches
    return best


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(__doc__.splitlines()[0], argv, backends=False)
    print_header("loader against aiodataloader, asyncio, in-memory batch_load", args)
    print(
        "   us/load = CPU time per load (best of"
        f" {REPEATS[args.mode]}); wall = wall-clock time per load;"
        " ratio = keybatch / aiodataloader"
    )
    results = []
    rows = []
    for callers in CALLERS[args.mode]:
        r = run_cell(callers, args.mode)
        results.append({"callers": callers, **r})
        rows.append(
            [
                callers,
                r["keybatch_batch"],
                r["keybatch"],
                r["aiodataloader"],
                r["keybatch"] / r["aiodataloader"],
                r["keybatch_wall"],
                r["aiodataloader_wall"],
                r["keybatch_wall"] / r["aiodataloader_wall"],
            ]
        )
    print_table(
        [
            "callers",
            "ids/batch",
            "keybatch us/load",
            "aiodataloader us/load",
            "ratio",
            "keybatch wall",
            "aiodataloader wall",
            "wall ratio",
        ],
        rows,
    )
    write_json(args.json, "loader", args, results)
    return results


if __name__ == "__main__":
    main()
