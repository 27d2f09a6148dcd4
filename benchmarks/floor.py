"""The floor: the least code that batches the overhead workload correctly.

This is the yardstick of ``bench_overhead``. It does what the project's reference
floor does (``../shared/bench/floor.py`` beside the repository, on trio and on
asyncio), written here so the benchmarks carry their own copy:

Workload: ``callers`` tasks live for the whole run; caller ``i`` works on key
``i % keys`` and awaits ``ops // callers`` operations on it, one after the other.
Each operation increments a counter in the key's resource. Loading a key copies its
dict out of an in-memory store; saving puts the copy back. There is no window.

Algorithm: each key has a list of operations waiting and one wake-up object for
the batch being filled (a ``trio.Event`` on trio, a future on asyncio). A caller
appends its operation to its key's list and parks on that key's current wake-up
object. One sweeper task loops: yield to the loop once, then for every key whose
list is not empty, swap in a fresh list and a fresh wake-up object, "load" the key,
apply the operations in order, "save" it and wake the whole batch at once.

Nothing else: no routing to workers, no per-caller results or errors, no
cancellation handling, no deadlines. Whatever keybatch costs above this is its own.

Each function returns CPU seconds (``time.process_time``) per operation, timed
from before the tasks are spawned until the last one finished, and raises if an
operation was lost. The asyncio one runs on whatever loop it is awaited in
(asyncio's own or uvloop's).

Check it against the reference, interleaved in one process::

    python -m benchmarks.floor                 # the three overhead cells, 3 loops
    python -m benchmarks.floor --reference PATH/floor.py --repeats 7
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import trio

OPS = 100_000
CELLS = ((1000, 10), (1000, 1000), (100, 1))
LOOPS = ("trio", "asyncio", "uvloop")


def bump(resource: dict[str, int]) -> int:
    """The operation of the workload: one more on the key's counter."""
    resource["n"] += 1
    return resource["n"]


def check(store: Mapping[Any, dict[str, int]], expected: int) -> None:
    """Raise if the counters in ``store`` do not add up to ``expected``."""
    applied = sum(resource["n"] for resource in store.values())
    if applied != expected:
        raise AssertionError(f"floor: {applied} operations applied, {expected} sent")


async def trio_floor(callers: int = 1000, keys: int = 10, ops: int = OPS) -> float:
    """The floor on trio: CPU seconds per operation."""
    each = ops // callers
    queued: dict[int, list[Callable[[dict[str, int]], int]]] = {
        k: [] for k in range(keys)
    }
    wakers: dict[int, trio.Event] = {k: trio.Event() for k in range(keys)}
    store: dict[int, dict[str, int]] = {k: {"n": 0} for k in range(keys)}
    finished = trio.Event()
    running = [callers]

    async def caller(index: int) -> None:
        key = index % keys
        for _ in range(each):
            queued[key].append(bump)
            await wakers[key].wait()
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

    began = time.process_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sweeper)
        for index in range(callers):
            nursery.start_soon(caller, index)
    spent = time.process_time() - began
    check(store, each * callers)
    return spent / (each * callers)


async def asyncio_floor(callers: int = 1000, keys: int = 10, ops: int = OPS) -> float:
    """The floor on the running asyncio loop: CPU seconds per operation."""
    loop = asyncio.get_running_loop()
    each = ops // callers
    queued: dict[int, list[Callable[[dict[str, int]], int]]] = {
        k: [] for k in range(keys)
    }
    wakers: dict[int, asyncio.Future[None]] = {
        k: loop.create_future() for k in range(keys)
    }
    store: dict[int, dict[str, int]] = {k: {"n": 0} for k in range(keys)}
    finished = asyncio.Event()
    running = [callers]

    async def caller(index: int) -> None:
        key = index % keys
        for _ in range(each):
            queued[key].append(bump)
            await wakers[key]
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

    began = time.process_time()
    await asyncio.gather(sweeper(), *(caller(index) for index in range(callers)))
    spent = time.process_time() - began
    check(store, each * callers)
    return spent / (each * callers)


# ------------------------------------------------------------ running on a loop


def run_loop(loop: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``await fn(*args)`` in a fresh event loop: trio, asyncio or uvloop."""
    if loop == "trio":
        return trio.run(fn, *args)
    if loop == "asyncio":
        return asyncio.run(fn(*args))
    if loop == "uvloop":
        import uvloop

        return uvloop.run(fn(*args))
    raise ValueError(f"unknown event loop {loop!r}")


def floor_on(loop: str, callers: int, keys: int, ops: int = OPS) -> float:
    """CPU seconds per operation of this floor on ``loop``, in a fresh loop."""
    fn = trio_floor if loop == "trio" else asyncio_floor
    return float(run_loop(loop, fn, callers, keys, ops))


# ------------------------------------------------------ checking the reference

DEFAULT_REFERENCE = (
    Path(__file__).resolve().parent.parent.parent / "shared/bench/floor.py"
)


def load_reference(path: str | os.PathLike[str]) -> ModuleType:
    """Import the reference floor from a file path."""
    spec = importlib.util.spec_from_file_location("reference_floor", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare(
    reference: ModuleType,
    loops: Sequence[str],
    cells: Sequence[tuple[int, int]],
    repeats: int,
    ops: int,
) -> list[dict[str, Any]]:
    """Both floors, interleaved (ours, reference, ours, ...), us per operation."""
    rows = []
    for loop in loops:
        for callers, keys in cells:
            ref_fn = reference.trio_floor if loop == "trio" else reference.asyncio_floor
            ours, theirs = [], []
            for _ in range(repeats):
                ours.append(floor_on(loop, callers, keys, ops) * 1e6)
                theirs.append(run_loop(loop, ref_fn, callers, keys, ops) * 1e6)
            rows.append(
                {
                    "loop": loop,
                    "callers": callers,
                    "keys": keys,
                    "ours_median": statistics.median(ours),
                    "ours_best": min(ours),
                    "reference_median": statistics.median(theirs),
                    "reference_best": min(theirs),
                    "paired": statistics.median(
                        o / t for o, t in zip(ours, theirs, strict=True)
                    ),
                }
            )
            print(
                f"{loop:>8} {callers:>5} x {keys:<5}"
                f" ours {rows[-1]['ours_median']:6.2f} (best {min(ours):5.2f})"
                f"  reference {rows[-1]['reference_median']:6.2f}"
                f" (best {min(theirs):5.2f}) us/op"
                f"  ours/reference {rows[-1]['paired']:.3f}",
                flush=True,
            )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="This floor against the reference floor, interleaved."
    )
    parser.add_argument(
        "--reference",
        default=os.environ.get("KEYBATCH_REFERENCE_FLOOR", str(DEFAULT_REFERENCE)),
        help="path of the reference floor.py (default: ../shared/bench/floor.py)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ops", type=int, default=OPS)
    parser.add_argument("--loops", nargs="+", choices=LOOPS, default=list(LOOPS))
    args = parser.parse_args(argv)
    if args.ops < max(callers for callers, _ in CELLS):
        parser.error(f"--ops must be at least {max(c for c, _ in CELLS)}")
    if not Path(args.reference).is_file():
        print(f"no reference floor at {args.reference}", file=sys.stderr)
        return 2
    reference = load_reference(args.reference)
    print(
        f"floor check: CPU us/op, median (best) of {args.repeats} interleaved runs,"
        f" {args.ops:,} operations each; ours/reference = median of paired ratios"
    )
    compare(reference, args.loops, CELLS, args.repeats, args.ops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
