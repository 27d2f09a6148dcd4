"""Overhead per operation with in-memory load/save, against the floor.

Long-lived callers each await ``run`` in a loop (every call awaited, as in the Go
original's benchmark). The grid is callers x keys x min_duration. In the same run,
in the same process, the same workload goes through:

- ``keybatch``: ``Processor.run`` on the default options;
- ``floor``: the lower bound, a minimal hand-written batcher on the bare event
  loop (callers append to one list and park on one event per batch, trio.Event on
  trio, one future per batch on asyncio; one task loads each key once, applies
  everything, saves each key once and wakes them all). It has no per-key queues, no
  routing, no cancellation handling and no error delivery;
- ``lock``: the naive way, a per-key lock around load, op and save.

Load and save are in-memory (a dict); they do not wait, so ``lock`` never waits
either: it measures pure bookkeeping, which is why it can beat both batchers here.
Batching pays when load and save do I/O: see bench_database.

Each figure is the best (lowest) of a few interleaved repetitions. Run:
``python -m benchmarks.bench_overhead [--tiny | --full] [--backend trio|asyncio]``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
import trio

import keybatch

from ._common import (
    cpu_now,
    now,
    parse_args,
    print_header,
    print_table,
    pyplot,
    run_on,
    write_json,
)

MS = 0.001
Run = Callable[..., Awaitable[Any]]

# (callers, keys, min_duration) cells per mode.
GRIDS: dict[str, list[tuple[int, int, float]]] = {
    "tiny": [(10, 1, 0.0), (10, 10, 0.0), (10, 10, 1 * MS)],
    "quick": [
        *[(c, k, 0.0) for c in (10, 100, 1000, 10000) for k in (1, 10, 1000)],
        (1000, 10, 1 * MS),
        (1000, 10, 100 * MS),
    ],
    "full": [
        (c, k, md)
        for md in (0.0, 1 * MS, 100 * MS)
        for c in (10, 100, 1000, 10000)
        for k in (1, 10, 1000, 100000)
    ],
}
# Operations per cell (min_duration 0), and wall-clock budget per run when
# min_duration > 0 (every caller waits a window per operation).
TOTAL_OPS = {"tiny": 400, "quick": 30000, "full": 100000}
WINDOW_BUDGET = {"tiny": 0.01, "quick": 0.3, "full": 1.0}
REPEATS = {"tiny": 1, "quick": 5, "full": 3}


def add(resource: list[int], n: int) -> int:
    resource[0] += n
    return resource[0]


# ---------------------------------------------------------------- implementations


@asynccontextmanager
async def keybatch_impl(
    backend: str, load: Any, save: Any, min_duration: float
) -> AsyncIterator[Run]:
    async with keybatch.open_processor(
        load=load, save=save, min_duration=min_duration
    ) as proc:
        yield proc.run


class _TrioFloor:
    """The lower bound on trio: one list, one trio.Event per batch, one task."""

    def __init__(self, load: Any, save: Any, min_duration: float) -> None:
        self.load = load
        self.save = save
        self.min_duration = min_duration
        self.items: list[list[Any]] = []
        self.event = trio.Event()
        self.wakeup = trio.Event()

    async def run(self, key: str, op: Callable[..., Any], *args: Any) -> Any:
        slot = [key, op, args, None]
        items = self.items
        items.append(slot)
        if len(items) == 1:
            self.wakeup.set()
        await self.event.wait()
        return slot[3]

    async def serve(self) -> None:
        load, save = self.load, self.save
        while True:
            await self.wakeup.wait()
            if self.min_duration:
                await trio.sleep(self.min_duration)
            items, event = self.items, self.event
            self.items, self.event, self.wakeup = [], trio.Event(), trio.Event()
            touched: dict[str, Any] = {}
            for slot in items:
                key = slot[0]
                if key in touched:
                    resource = touched[key]
                else:
                    resource = touched[key] = await load(key)
                slot[3] = slot[1](resource, *slot[2])
            for key, resource in touched.items():
                await save(key, resource)
            event.set()


class _AsyncioFloor:
    """The lower bound on asyncio: one list, one future per batch, one task."""

    def __init__(self, load: Any, save: Any, min_duration: float) -> None:
        self.load = load
        self.save = save
        self.min_duration = min_duration
        self.loop = asyncio.get_running_loop()
        self.items: list[list[Any]] = []
        self.future = self.loop.create_future()
        self.wakeup = self.loop.create_future()

    async def run(self, key: str, op: Callable[..., Any], *args: Any) -> Any:
        slot = [key, op, args, None]
        items = self.items
        items.append(slot)
        if len(items) == 1:
            self.wakeup.set_result(None)
        await self.future
        return slot[3]

    async def serve(self) -> None:
        load, save, loop = self.load, self.save, self.loop
        while True:
            await self.wakeup
            if self.min_duration:
                await asyncio.sleep(self.min_duration)
            items, future = self.items, self.future
            self.items = []
            self.future, self.wakeup = loop.create_future(), loop.create_future()
            touched: dict[str, Any] = {}
            for slot in items:
                key = slot[0]
                if key in touched:
                    resource = touched[key]
                else:
                    resource = touched[key] = await load(key)
                slot[3] = slot[1](resource, *slot[2])
            for key, resource in touched.items():
                await save(key, resource)
            future.set_result(None)


@asynccontextmanager
async def floor_impl(
    backend: str, load: Any, save: Any, min_duration: float
) -> AsyncIterator[Run]:
    floor: _TrioFloor | _AsyncioFloor
    if backend == "trio":
        floor = _TrioFloor(load, save, min_duration)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(floor.serve)
            yield floor.run
            nursery.cancel_scope.cancel()
    else:
        floor = _AsyncioFloor(load, save, min_duration)
        task = asyncio.ensure_future(floor.serve())
        try:
            yield floor.run
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task


@asynccontextmanager
async def lock_impl(
    backend: str, load: Any, save: Any, min_duration: float
) -> AsyncIterator[Run]:
    new_lock: Callable[[], Any] = trio.Lock if backend == "trio" else asyncio.Lock
    locks: dict[str, Any] = {}

    async def run(key: str, op: Callable[..., Any], *args: Any) -> Any:
        lock = locks.get(key)
        if lock is None:
            lock = locks[key] = new_lock()
        async with lock:
            resource = await load(key)
            value = op(resource, *args)
            await save(key, resource)
            return value

    yield run


IMPLS = {"keybatch": keybatch_impl, "floor": floor_impl, "lock": lock_impl}

# ---------------------------------------------------------------- the workload


async def measure(
    impl: str,
    backend: str,
    callers: int,
    keys: Sequence[str],
    min_duration: float,
    ops_per_caller: int,
) -> tuple[float, float, float]:
    """Wall and CPU seconds for ``callers`` tasks to await ``ops_per_caller`` runs
    each, and keybatch's operations per batch (nan for the references)."""
    store: dict[str, list[int]] = {}

    async def load(key: str) -> list[int]:
        resource = store.get(key)
        if resource is None:
            resource = store[key] = [0]
        return resource

    async def save(key: str, resource: list[int]) -> None:
        store[key] = resource

    nkeys = len(keys)
    arrived = 0
    ready = anyio.Event()
    gate = anyio.Event()

    async with IMPLS[impl](backend, load, save, min_duration) as run:

        async def caller(i: int) -> None:
            nonlocal arrived
            arrived += 1
            if arrived == callers:
                ready.set()
            await gate.wait()
            for j in range(ops_per_caller):
                await run(keys[(i + j * callers) % nkeys], add, 1)

        async with anyio.create_task_group() as tg:
            for i in range(callers):
                tg.start_soon(caller, i)
            await ready.wait()
            started, started_cpu = now(), cpu_now()
            gate.set()
        elapsed, elapsed_cpu = now() - started, cpu_now() - started_cpu
        ops_per_batch = float("nan")
        proc = getattr(run, "__self__", None)
        if isinstance(proc, keybatch.Processor):
            stats = proc.statistics()
            ops_per_batch = stats.operations_done / max(1, stats.batches_done)
    total = sum(r[0] for r in store.values())
    if total != callers * ops_per_caller:  # the benchmark must not lie
        raise AssertionError(f"{impl}: {total} != {callers * ops_per_caller}")
    return elapsed, elapsed_cpu, ops_per_batch


def ops_per_caller(mode: str, callers: int, min_duration: float) -> int:
    n = max(1, TOTAL_OPS[mode] // callers)
    if min_duration:
        n = min(n, max(1, round(WINDOW_BUDGET[mode] / min_duration)))
    return n


def run_cell(
    backend: str, callers: int, nkeys: int, min_duration: float, mode: str
) -> dict[str, float]:
    """CPU us/op (``impl``) and wall us/op (``impl_wall``) of every implementation
    on one cell, each the best of the repetitions."""
    keys = [f"key-{i}" for i in range(nkeys)]
    n = ops_per_caller(mode, callers, min_duration)
    impls = ["keybatch", "floor"]
    if min_duration == 0:
        impls.append("lock")  # the lock has no window: measure it once per cell
    best = {k: float("inf") for impl in impls for k in (impl, f"{impl}_wall")}
    for _ in range(REPEATS[mode]):
        for impl in impls:  # interleaved, so drift hits every implementation
            wall, cpu, per_batch = run_on(
                backend, measure, impl, backend, callers, keys, min_duration, n
            )
            if impl == "keybatch":
                best["ops_per_batch"] = per_batch
            best[impl] = min(best[impl], cpu / (callers * n) * 1e6)
            best[f"{impl}_wall"] = min(best[f"{impl}_wall"], wall / (callers * n) * 1e6)
    return best


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(__doc__.splitlines()[0], argv)
    print_header("overhead per operation, in-memory load/save", args)
    print(
        "   us/op = CPU time of the process per operation (best of"
        f" {REPEATS[args.mode]}); wall x = the same ratio in wall-clock time;"
        " ops/b = keybatch's operations per batch"
    )
    results: list[dict[str, Any]] = []
    lock_cache: dict[tuple[str, int, int], tuple[float, float]] = {}
    rows = []
    nan = float("nan")
    grid = GRIDS[args.mode]
    for index, (callers, nkeys, md) in enumerate(grid, 1):
        if args.mode == "full":  # a long run: say how far it got
            print(
                f"   cell {index}/{len(grid)}: {callers} callers, {nkeys} keys,"
                f" min_duration {md * 1000:g} ms",
                file=sys.stderr,
                flush=True,
            )
        row: list[object] = [callers, nkeys, f"{md * 1000:g}"]
        for backend in args.backends:
            us = run_cell(backend, callers, nkeys, md, args.mode)
            if "lock" in us:
                lock_cache[backend, callers, nkeys] = (us["lock"], us["lock_wall"])
            lock, lock_wall = lock_cache.get((backend, callers, nkeys), (nan, nan))
            ratio = us["keybatch"] / us["floor"]
            wall_ratio = us["keybatch_wall"] / us["floor_wall"]
            results.append(
                {
                    "backend": backend,
                    "callers": callers,
                    "keys": nkeys,
                    "min_duration": md,
                    "keybatch_us": us["keybatch"],
                    "floor_us": us["floor"],
                    "lock_us": lock,
                    "keybatch_wall_us": us["keybatch_wall"],
                    "floor_wall_us": us["floor_wall"],
                    "lock_wall_us": lock_wall,
                    "ratio": ratio,
                    "ops_per_batch": us["ops_per_batch"],
                    "wall_ratio": wall_ratio,
                }
            )
            row += [
                us["keybatch"],
                us["floor"],
                lock,
                ratio,
                wall_ratio,
                us["ops_per_batch"],
            ]
        rows.append(row)
    headers = ["callers", "keys", "min ms"]
    for backend in args.backends:
        headers += [f"{backend} kb", "floor", "lock", "kb/floor", "wall x", "ops/b"]
    print_table(headers, rows)
    for backend in args.backends:
        target = [
            r
            for r in results
            if r["backend"] == backend
            and (r["callers"], r["keys"], r["min_duration"]) == (1000, 10, 0.0)
        ]
        for r in target:
            verdict = "met" if r["ratio"] <= 2 else "MISSED"
            print(
                f"target {backend}, 1000 callers x 10 keys, min_duration 0:"
                f" keybatch/floor = {r['ratio']:.2f} CPU, {r['wall_ratio']:.2f} wall"
                f" (<= 2: {verdict})"
            )
    write_json(args.json, "overhead", args, results)
    if args.plot:
        plot(results, args.plot)
    return results


def plot(results: list[dict[str, Any]], directory: str) -> None:
    plt = pyplot()
    # Throughput against callers, 10 keys, min_duration 0.
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for backend, style in (("trio", "-"), ("asyncio", "--")):
        cells = sorted(
            (r["callers"], r)
            for r in results
            if r["backend"] == backend and r["keys"] == 10 and r["min_duration"] == 0
        )
        if not cells:
            continue
        xs = [c for c, _ in cells]
        for impl, marker in (("keybatch", "o"), ("floor", "s"), ("lock", "^")):
            ys = [1e3 / r[f"{impl}_us"] for _, r in cells]
            ax.plot(xs, ys, style, marker=marker, label=f"{impl} ({backend})")
    ax.set_xscale("log")
    ax.set_xlabel("concurrent callers (10 keys, min_duration 0)")
    ax.set_ylabel("thousand operations per CPU second")
    ax.set_title("Throughput against callers, in-memory load/save")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{directory}/throughput_vs_callers.png", dpi=110)
    plt.close(fig)
    # keybatch / floor ratio for every cell.
    cells = sorted(
        {(r["min_duration"], r["callers"], r["keys"]) for r in results},
    )
    fig, ax = plt.subplots(figsize=(max(8, 0.3 * len(cells)), 4.2 + 0.02 * len(cells)))
    sep = " " if len(cells) > 20 else "\n"
    labels = [f"{c}x{k}{sep}{md * 1000:g}ms" for md, c, k in cells]
    width = 0.4
    for n, backend in enumerate(("trio", "asyncio")):
        by = {
            (r["min_duration"], r["callers"], r["keys"]): r["ratio"]
            for r in results
            if r["backend"] == backend
        }
        if not by:
            continue
        xs = [i + (n - 0.5) * width for i in range(len(cells))]
        ax.bar(xs, [by.get(c, 0) for c in cells], width, label=backend)
    ax.axhline(2, color="red", linewidth=1, linestyle=":", label="target (2x)")
    ax.axhline(1, color="gray", linewidth=1)
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels(labels, fontsize=6, rotation=90 if len(cells) > 20 else 0)
    ax.set_ylabel("keybatch / floor (CPU time per op)")
    ax.set_xlabel("callers x keys, min_duration")
    ax.set_title("Overhead against the hand-written lower bound")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{directory}/overhead_vs_floor.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
