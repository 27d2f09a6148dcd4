"""Lower bound of an ``await processor.run(key, op)`` API: the floor plus its cost.

What must any library whose API is ``await processor.run(key, op)`` (one
``async def`` call per operation, returning that operation's own result) cost
above the floor (``benchmarks/floor.py``)? The workload is the floor's:
``callers`` long-lived tasks, caller ``i`` awaiting ``ops // callers`` operations
one after the other on key ``i % keys``; load copies the key's dict out of an
in-memory store, save puts it back; one sweeper task, no window. Each variant is a
copy of the floor's algorithm with exactly one thing added to the one before:

- ``floor``: ``floor.trio_floor`` / ``floor.asyncio_floor`` as they are;
- ``frame``: each operation goes through one ``async def run(key, op)`` coroutine
  that appends ``op`` to its key's list and awaits the key's current wake-up
  object: the bare cost of the API being an async function, nothing else;
- ``result``: as ``frame``, and each caller gets its operation's own return value:
  ``run`` appends a small record per call (a list ``[op, None]``), the sweeper
  writes the op's return value into it, ``run`` returns it after the wake-up;
- ``semantics``: as ``result``, plus what keybatch's documented semantics require
  per call: the key (a str ``f"k{i}"`` here, as keybatch's default router needs;
  the variants above keep the floor's int keys) is routed with
  ``mmh3.hash(key.encode(), 0, False) % 32`` to a worker's table of keys (all 32
  tables are the one sweeper's), and each op runs in a copy of its caller's
  contextvars context (``contextvars.copy_context()`` at call time,
  ``ctx.run(op, resource)`` in the sweeper);
- ``keybatch``: the real thing, ``bench_overhead.keybatch_side`` (the public API,
  ``min_duration=0``, default workers).

The wake-up object is the floor's: a ``trio.Event`` per key and batch on trio, a
future per key and batch on asyncio and uvloop. Every variant checks that no
operation was lost (``floor.check``). Nothing here handles cancellation, errors or
deadlines: the first three rows above keybatch are bounds, not alternatives.

Each figure is CPU time of the process (``time.process_time``) per operation. All
variants run interleaved in one process (floor, frame, result, semantics,
keybatch, floor, ...), each in a fresh event loop; the table gives the median of
the repetitions and each variant's median over the floor's.

Cells: 1000 callers x 10 keys, 1000 x 1000, 100 x 1 (bench_overhead's quick
cells), 3 repetitions in quick mode, 9 with ``--full``.

Run: ``python -m benchmarks.bench_bound [--tiny | --full]
[--backend trio|asyncio|uvloop|all] [--repeats N] [--json PATH]``.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import copy_context
from typing import Any

import mmh3
import trio

from . import floor
from ._common import LOOPS, parse_args, print_header, print_table, write_json
from .bench_overhead import keybatch_side
from .floor import bump

TITLE = "lower bound of an `await processor.run(key, op)` API, against the floor"
CELLS: dict[str, list[tuple[int, int]]] = {
    "tiny": [(20, 2), (20, 20), (10, 1)],
    "quick": [(1000, 10), (1000, 1000), (100, 1)],
    "full": [(1000, 10), (1000, 1000), (100, 1)],
}
OPS = {"tiny": 200, "quick": 100_000, "full": 100_000}
REPEATS = {"tiny": 1, "quick": 3, "full": 9}
VARIANTS = ("floor", "frame", "result", "semantics", "keybatch")
# Workers the `semantics` variant routes to (keybatch's default on two cores).
WORKERS = 32

Op = Callable[[dict[str, int]], int]


# ------------------------------------------------------------------------ trio


async def _trio_timed(
    sweeper: Callable[[], Awaitable[None]],
    caller: Callable[[int], Awaitable[None]],
    callers: int,
) -> float:
    """Spawn the floor's way (sweeper, then the callers); CPU seconds spent."""
    began = time.process_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sweeper)
        for index in range(callers):
            nursery.start_soon(caller, index)
    return time.process_time() - began


async def trio_frame(callers: int, keys: int, ops: int) -> float:
    """The floor on trio, each operation through ``async def run(key, op)``."""
    each = ops // callers
    queued: dict[int, list[Op]] = {k: [] for k in range(keys)}
    wakers: dict[int, trio.Event] = {k: trio.Event() for k in range(keys)}
    store: dict[int, dict[str, int]] = {k: {"n": 0} for k in range(keys)}
    finished = trio.Event()
    running = [callers]

    async def run(key: int, op: Op) -> None:
        queued[key].append(op)
        await wakers[key].wait()

    async def caller(index: int) -> None:
        key = index % keys
        for _ in range(each):
            await run(key, bump)
        running[0] -= 1
        if running[0] == 0:
            finished.set()

    async def sweeper() -> None:
        while not finished.is_set():
            await trio.lowlevel.checkpoint()
            for key in range(keys):
                batch = queued[key]
                if not batch:
                    continue
                waker = wakers[key]
                queued[key] = []
                wakers[key] = trio.Event()
                resource = dict(store[key])
                for op in batch:
                    op(resource)
                store[key] = resource
                waker.set()

    spent = await _trio_timed(sweeper, caller, callers)
    floor.check(store, each * callers)
    return spent / (each * callers)


async def trio_result(callers: int, keys: int, ops: int) -> float:
    """As ``trio_frame``, and ``run`` returns its operation's own result."""
    each = ops // callers
    queued: dict[int, list[list[Any]]] = {k: [] for k in range(keys)}
    wakers: dict[int, trio.Event] = {k: trio.Event() for k in range(keys)}
    store: dict[int, dict[str, int]] = {k: {"n": 0} for k in range(keys)}
    finished = trio.Event()
    running = [callers]

    async def run(key: int, op: Op) -> Any:
        record: list[Any] = [op, None]
        queued[key].append(record)
        await wakers[key].wait()
        return record[1]

    async def caller(index: int) -> None:
        key = index % keys
        for _ in range(each):
            await run(key, bump)
        running[0] -= 1
        if running[0] == 0:
            finished.set()

    async def sweeper() -> None:
        while not finished.is_set():
            await trio.lowlevel.checkpoint()
            for key in range(keys):
                batch = queued[key]
                if not batch:
                    continue
                waker = wakers[key]
                queued[key] = []
                wakers[key] = trio.Event()
                resource = dict(store[key])
                for record in batch:
                    record[1] = record[0](resource)
                store[key] = resource
                waker.set()

    spent = await _trio_timed(sweeper, caller, callers)
    floor.check(store, each * callers)
    return spent / (each * callers)


async def trio_semantics(callers: int, keys: int, ops: int) -> float:
    """As ``trio_result``, plus routing and a context copy per call."""
    each = ops // callers
    names = [f"k{k}" for k in range(keys)]
    queued: dict[str, list[list[Any]]] = {name: [] for name in names}
    tables = (queued,) * WORKERS
    wakers: dict[str, trio.Event] = {name: trio.Event() for name in names}
    store: dict[str, dict[str, int]] = {name: {"n": 0} for name in names}
    finished = trio.Event()
    running = [callers]

    async def run(key: str, op: Op) -> Any:
        record: list[Any] = [op, None, copy_context()]
        tables[mmh3.hash(key.encode(), 0, False) % WORKERS][key].append(record)
        await wakers[key].wait()
        return record[1]

    async def caller(index: int) -> None:
        key = names[index % keys]
        for _ in range(each):
            await run(key, bump)
        running[0] -= 1
        if running[0] == 0:
            finished.set()

    async def sweeper() -> None:
        while not finished.is_set():
            await trio.lowlevel.checkpoint()
            for key in names:
                batch = queued[key]
                if not batch:
                    continue
                waker = wakers[key]
                queued[key] = []
                wakers[key] = trio.Event()
                resource = dict(store[key])
                for record in batch:
                    record[1] = record[2].run(record[0], resource)
                store[key] = resource
                waker.set()

    spent = await _trio_timed(sweeper, caller, callers)
    floor.check(store, each * callers)
    return spent / (each * callers)


# ------------------------------------------------------------ asyncio, uvloop


async def _asyncio_timed(
    sweeper: Callable[[], Awaitable[None]],
    caller: Callable[[int], Awaitable[None]],
    callers: int,
) -> float:
    """Spawn the floor's way (one gather); CPU seconds spent."""
    began = time.process_time()
    await asyncio.gather(sweeper(), *(caller(index) for index in range(callers)))
    return time.process_time() - began


async def asyncio_frame(callers: int, keys: int, ops: int) -> float:
    """The floor on asyncio, each operation through ``async def run(key, op)``."""
    loop = asyncio.get_running_loop()
    each = ops // callers
    queued: dict[int, list[Op]] = {k: [] for k in range(keys)}
    wakers: dict[int, asyncio.Future[None]] = {
        k: loop.create_future() for k in range(keys)
    }
    store: dict[int, dict[str, int]] = {k: {"n": 0} for k in range(keys)}
    finished = asyncio.Event()
    running = [callers]

    async def run(key: int, op: Op) -> None:
        queued[key].append(op)
        await wakers[key]

    async def caller(index: int) -> None:
        key = index % keys
        for _ in range(each):
            await run(key, bump)
        running[0] -= 1
        if running[0] == 0:
            finished.set()

    async def sweeper() -> None:
        while not finished.is_set():
            await asyncio.sleep(0)
            for key in range(keys):
                batch = queued[key]
                if not batch:
                    continue
                waker = wakers[key]
                queued[key] = []
                wakers[key] = loop.create_future()
                resource = dict(store[key])
                for op in batch:
                    op(resource)
                store[key] = resource
                waker.set_result(None)

    spent = await _asyncio_timed(sweeper, caller, callers)
    floor.check(store, each * callers)
    return spent / (each * callers)


async def asyncio_result(callers: int, keys: int, ops: int) -> float:
    """As ``asyncio_frame``, and ``run`` returns its operation's own result."""
    loop = asyncio.get_running_loop()
    each = ops // callers
    queued: dict[int, list[list[Any]]] = {k: [] for k in range(keys)}
    wakers: dict[int, asyncio.Future[None]] = {
        k: loop.create_future() for k in range(keys)
    }
    store: dict[int, dict[str, int]] = {k: {"n": 0} for k in range(keys)}
    finished = asyncio.Event()
    running = [callers]

    async def run(key: int, op: Op) -> Any:
        record: list[Any] = [op, None]
        queued[key].append(record)
        await wakers[key]
        return record[1]

    async def caller(index: int) -> None:
        key = index % keys
        for _ in range(each):
            await run(key, bump)
        running[0] -= 1
        if running[0] == 0:
            finished.set()

    async def sweeper() -> None:
        while not finished.is_set():
            await asyncio.sleep(0)
            for key in range(keys):
                batch = queued[key]
                if not batch:
                    continue
                waker = wakers[key]
                queued[key] = []
                wakers[key] = loop.create_future()
                resource = dict(store[key])
                for record in batch:
                    record[1] = record[0](resource)
                store[key] = resource
                waker.set_result(None)

    spent = await _asyncio_timed(sweeper, caller, callers)
    floor.check(store, each * callers)
    return spent / (each * callers)


async def asyncio_semantics(callers: int, keys: int, ops: int) -> float:
    """As ``asyncio_result``, plus routing and a context copy per call."""
    loop = asyncio.get_running_loop()
    each = ops // callers
    names = [f"k{k}" for k in range(keys)]
    queued: dict[str, list[list[Any]]] = {name: [] for name in names}
    tables = (queued,) * WORKERS
    wakers: dict[str, asyncio.Future[None]] = {
        name: loop.create_future() for name in names
    }
    store: dict[str, dict[str, int]] = {name: {"n": 0} for name in names}
    finished = asyncio.Event()
    running = [callers]

    async def run(key: str, op: Op) -> Any:
        record: list[Any] = [op, None, copy_context()]
        tables[mmh3.hash(key.encode(), 0, False) % WORKERS][key].append(record)
        await wakers[key]
        return record[1]

    async def caller(index: int) -> None:
        key = names[index % keys]
        for _ in range(each):
            await run(key, bump)
        running[0] -= 1
        if running[0] == 0:
            finished.set()

    async def sweeper() -> None:
        while not finished.is_set():
            await asyncio.sleep(0)
            for key in names:
                batch = queued[key]
                if not batch:
                    continue
                waker = wakers[key]
                queued[key] = []
                wakers[key] = loop.create_future()
                resource = dict(store[key])
                for record in batch:
                    record[1] = record[2].run(record[0], resource)
                store[key] = resource
                waker.set_result(None)

    spent = await _asyncio_timed(sweeper, caller, callers)
    floor.check(store, each * callers)
    return spent / (each * callers)


# -------------------------------------------------------------------- running

VariantFn = Callable[[int, int, int], Awaitable[float]]
TRIO: dict[str, VariantFn] = {
    "floor": floor.trio_floor,
    "frame": trio_frame,
    "result": trio_result,
    "semantics": trio_semantics,
}
ASYNCIO: dict[str, VariantFn] = {
    "floor": floor.asyncio_floor,
    "frame": asyncio_frame,
    "result": asyncio_result,
    "semantics": asyncio_semantics,
}


def measure(variant: str, loop: str, callers: int, keys: int, ops: int) -> float:
    """CPU seconds per operation of one variant, in a fresh ``loop``."""
    if variant == "keybatch":
        cpu, _wall, _per_batch = floor.run_loop(
            loop, keybatch_side, loop, callers, keys, ops
        )
        return float(cpu)
    fn = (TRIO if loop == "trio" else ASYNCIO)[variant]
    return float(floor.run_loop(loop, fn, callers, keys, ops))


def run_cell(
    loop: str, callers: int, keys: int, ops: int, repeats: int
) -> dict[str, Any]:
    """Every variant in turn, ``repeats`` times; us per operation."""
    us: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(repeats):
        for variant in VARIANTS:
            gc.collect()
            us[variant].append(measure(variant, loop, callers, keys, ops) * 1e6)
    medians = {variant: statistics.median(us[variant]) for variant in VARIANTS}
    return {
        "loop": loop,
        "callers": callers,
        "keys": keys,
        "ops": ops // callers * callers,
        "repeats": repeats,
        "us": us,
        "median_us": medians,
        "ratio": {v: medians[v] / medians["floor"] for v in VARIANTS},
    }


def span(results: Sequence[dict[str, Any]], variant: str) -> str:
    """``min-maxx`` of a variant's median ratio over the cells."""
    ratios = [r["ratio"][variant] for r in results]
    return f"{min(ratios):.2f}-{max(ratios):.2f}x"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(TITLE, argv, loops=LOOPS, default="all", repeats=True)
    repeats = REPEATS[args.mode] if args.repeats is None else args.repeats
    ops = OPS[args.mode]
    print_header(TITLE, args)
    print(
        f"   CPU us per operation (time.process_time), {ops:,} operations per run,"
        f" the variants interleaved, {repeats} runs each; median, and x = the"
        " variant's median / the floor's. frame = floor + an async def run(key, op)"
        " per operation; result = + its own return value; semantics = + mmh3"
        " routing and a context copy; keybatch = bench_overhead's keybatch side"
    )
    results: list[dict[str, Any]] = []
    for loop in args.backends:
        for callers, keys in CELLS[args.mode]:
            print(
                f"   {loop}: {callers} callers x {keys} keys ...",
                file=sys.stderr,
                flush=True,
            )
            results.append(run_cell(loop, callers, keys, ops, repeats))
    rows = [
        [
            r["loop"],
            r["callers"],
            r["keys"],
            *(r["median_us"][v] for v in VARIANTS),
            *(f"{r['ratio'][v]:.2f}x" for v in VARIANTS[1:]),
        ]
        for r in results
    ]
    print_table(
        [
            "loop",
            "callers",
            "keys",
            *VARIANTS,
            "frame x",
            "result x",
            "semantics x",
            "keybatch x",
        ],
        rows,
    )
    for loop in args.backends:
        cells = [r for r in results if r["loop"] == loop]
        print(
            f"{loop}: an async def call alone costs {span(cells, 'frame')} the floor;"
            " with a result of its own, route and context copy:"
            f" {span(cells, 'semantics')}"
        )
    sys.stdout.flush()
    write_json(args.json, "bound", args, results)
    return results


if __name__ == "__main__":
    main()
