"""Lower bound of an ``await processor.run(key, op)`` API: the floor plus its cost.

What must any library whose API is ``await processor.run(key, op)`` (one
``async def`` call per operation, returning that operation's own result) cost
above the floor (``benchmarks/floor.py``)? The workload is the floor's:
``callers`` long-lived tasks, caller ``i`` awaiting ``ops // callers`` operations
one after the other on key ``i % keys``; load copies the key's dict out of an
in-memory store, save puts it back; one sweeper task, no window. The variants add
one thing at a time to the floor, each to the one before:

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

``frame``, ``result`` and ``semantics`` share the floor's algorithm, written once
per event loop (``trio_bound``, ``asyncio_bound``: the callers, the sweeper, the
timing and the lost-operation check), and differ in two pieces only: the
per-call ``run(key, op)`` coroutine (``frame``, ``result``, ``semantics``: a
factory each, closing over the key lists and wake-up objects) and the per-batch
step that applies a batch to the resource and publishes the results
(``apply_ops``, ``apply_records``, ``apply_in_context``). Per operation there is
nothing but the variant's own ``run``: the caller awaits it directly. Per batch
the sweeper makes one function call the floor does not make (the step): the same
for the three variants, and per operation too where batches hold one operation
(1000 callers x 1000 keys), so their ratios over the floor include it.

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
from typing import Any, Protocol

import mmh3
import trio

from . import floor
from ._common import (
    LOOPS,
    each_cell,
    parse_args,
    print_header,
    print_table,
    write_json,
)
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

Resource = dict[str, int]
Op = Callable[[Resource], int]
# A key's list of what waits for the next batch (ops or records), per key.
Queued = dict[Any, list[Any]]
# The per-call coroutine: ``await run(key, op)``.
Run = Callable[[Any, Op], Awaitable[Any]]
# Builds a variant's ``run`` over the key lists and wake-up objects; the flag is
# True on trio (wait on a trio.Event), False on asyncio (await a future).
MakeRun = Callable[[Queued, dict[Any, Any], bool], Run]
# Applies a batch to the key's resource, publishing each op's result if any.
Apply = Callable[[list[Any], Resource], None]
# The keys of a cell, from their number: range (int keys) or str_keys.
KeyNames = Callable[[int], Sequence[Any]]


class _Flag(Protocol):
    def set(self) -> None: ...


def str_keys(keys: int) -> list[str]:
    """``keys`` str keys, ``k0``, ``k1``, ... (keybatch's router takes str)."""
    return [f"k{k}" for k in range(keys)]


# ------------------------------------------------- the variants' two pieces


def frame(queued: Queued, wakers: dict[Any, Any], on_trio: bool) -> Run:
    """``frame``'s run: append the op to its key's list, park on the key's wake-up."""
    if on_trio:

        async def run(key: int, op: Op) -> None:
            queued[key].append(op)
            await wakers[key].wait()

    else:

        async def run(key: int, op: Op) -> None:
            queued[key].append(op)
            await wakers[key]

    return run


def apply_ops(batch: list[Op], resource: Resource) -> None:
    """``frame``'s step: the ops in order, their results dropped."""
    for op in batch:
        op(resource)


def result(queued: Queued, wakers: dict[Any, Any], on_trio: bool) -> Run:
    """``result``'s run: as ``frame``'s through a record ``[op, None]``, whose
    second item it returns after the wake-up."""
    if on_trio:

        async def run(key: int, op: Op) -> Any:
            record: list[Any] = [op, None]
            queued[key].append(record)
            await wakers[key].wait()
            return record[1]

    else:

        async def run(key: int, op: Op) -> Any:
            record: list[Any] = [op, None]
            queued[key].append(record)
            await wakers[key]
            return record[1]

    return run


def apply_records(batch: list[list[Any]], resource: Resource) -> None:
    """``result``'s step: each record's op, its result written into the record."""
    for record in batch:
        record[1] = record[0](resource)


def semantics(queued: Queued, wakers: dict[Any, Any], on_trio: bool) -> Run:
    """``semantics``'s run: as ``result``'s, the key routed with mmh3 to one of
    ``WORKERS`` tables (all of them ``queued``), the record carrying a copy of the
    caller's context."""
    tables = (queued,) * WORKERS
    if on_trio:

        async def run(key: str, op: Op) -> Any:
            record: list[Any] = [op, None, copy_context()]
            tables[mmh3.hash(key.encode(), 0, False) % WORKERS][key].append(record)
            await wakers[key].wait()
            return record[1]

    else:

        async def run(key: str, op: Op) -> Any:
            record: list[Any] = [op, None, copy_context()]
            tables[mmh3.hash(key.encode(), 0, False) % WORKERS][key].append(record)
            await wakers[key]
            return record[1]

    return run


def apply_in_context(batch: list[list[Any]], resource: Resource) -> None:
    """``semantics``'s step: as ``apply_records``, each op run in its context."""
    for record in batch:
        record[1] = record[2].run(record[0], resource)


# variant: how its keys are named, its run factory, its per-batch step.
PARTS: dict[str, tuple[KeyNames, MakeRun, Apply]] = {
    "frame": (range, frame, apply_ops),
    "result": (range, result, apply_records),
    "semantics": (str_keys, semantics, apply_in_context),
}


# ------------------------------------------------------- the shared skeleton


def _caller(
    run: Run, names: Sequence[Any], callers: int, each: int, finished: _Flag
) -> Callable[[int], Awaitable[None]]:
    """The floor's caller, through ``run``: caller ``index`` awaits
    ``run(key, bump)`` ``each`` times on its key; the last one to end sets
    ``finished``."""
    keys = len(names)
    running = [callers]

    async def caller(index: int) -> None:
        key = names[index % keys]
        for _ in range(each):
            await run(key, bump)
        running[0] -= 1
        if running[0] == 0:
            finished.set()

    return caller


async def trio_bound(
    key_names: KeyNames,
    make_run: MakeRun,
    apply: Apply,
    callers: int,
    keys: int,
    ops: int,
) -> float:
    """The floor on trio with the variant's ``run`` and per-batch ``apply``: CPU
    seconds per operation."""
    each = ops // callers
    names = key_names(keys)
    queued: Queued = {key: [] for key in names}
    wakers: dict[Any, trio.Event] = {key: trio.Event() for key in names}
    store: dict[Any, Resource] = {key: {"n": 0} for key in names}
    finished = trio.Event()
    caller = _caller(make_run(queued, wakers, True), names, callers, each, finished)

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
                apply(batch, resource)
                store[key] = resource
                waker.set()

    began = time.process_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sweeper)
        for index in range(callers):
            nursery.start_soon(caller, index)
    spent = time.process_time() - began
    floor.check(store, each * callers)
    return spent / (each * callers)


async def asyncio_bound(
    key_names: KeyNames,
    make_run: MakeRun,
    apply: Apply,
    callers: int,
    keys: int,
    ops: int,
) -> float:
    """The floor on the running asyncio loop with the variant's ``run`` and
    per-batch ``apply``: CPU seconds per operation."""
    loop = asyncio.get_running_loop()
    each = ops // callers
    names = key_names(keys)
    queued: Queued = {key: [] for key in names}
    wakers: dict[Any, asyncio.Future[None]] = {
        key: loop.create_future() for key in names
    }
    store: dict[Any, Resource] = {key: {"n": 0} for key in names}
    finished = asyncio.Event()
    caller = _caller(make_run(queued, wakers, False), names, callers, each, finished)

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
                apply(batch, resource)
                store[key] = resource
                waker.set_result(None)

    began = time.process_time()
    await asyncio.gather(sweeper(), *(caller(index) for index in range(callers)))
    spent = time.process_time() - began
    floor.check(store, each * callers)
    return spent / (each * callers)


# -------------------------------------------------------------------- running


def measure(variant: str, loop: str, callers: int, keys: int, ops: int) -> float:
    """CPU seconds per operation of one variant, in a fresh ``loop``."""
    if variant == "keybatch":
        cpu, _wall, _per_batch = floor.run_loop(
            loop, keybatch_side, loop, callers, keys, ops
        )
        return float(cpu)
    if variant == "floor":
        return floor.floor_on(loop, callers, keys, ops)
    bound = trio_bound if loop == "trio" else asyncio_bound
    return float(floor.run_loop(loop, bound, *PARTS[variant], callers, keys, ops))


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
    results = each_cell(args.backends, CELLS[args.mode], run_cell, ops, repeats)
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
