"""Memory: bytes per pending operation on a hot key; back to baseline after many keys.

Two measurements per event loop, each in a fresh loop, through the public API only:

1. **A hot key inside a long window** (tracemalloc: Python allocations). A
   processor with ``min_duration`` of an hour; one ``submit`` on key "hot" opens
   its batch (loaded, window open). Then ``submit`` N more operations on "hot"
   (the returned ``Pending`` is dropped: the processor keeps it) and divide the
   growth by N: the bytes per operation still queued. Then yield until the
   worker has taken them all into the open batch (memory stops moving) and
   divide again: the bytes per operation applied and waiting for the save.
   Target (issue 8): <= 300 B. ``flush()`` then ends the batch; what is left
   over the baseline is printed.
2. **Many distinct keys** (no tracing, so at full speed: ``sys.getallocatedblocks``
   and gc-tracked objects). 1000 callers await ``run`` on distinct keys
   (``min_duration=0``) until N keys went through, every batch one operation.
   The baseline is taken after a warm-up of the same shape (whatever grows with
   the callers and workers, not with the keys, is there already). After the push
   and ``gc.collect()``: "back" means fewer than 1000 memory blocks and 500
   objects left over the baseline, whatever N, and ``statistics().keys`` is 0.
   CPU microseconds per key are printed too. Then a burst (tracemalloc, bytes):
   B distinct keys submitted at once (bytes per pending operation on a key of
   its own), flushed; what is left must be under 64 KiB + 10 KiB per worker
   (CPython keeps up to 16 free blocks of a drained deque, and each worker's
   current wait objects are new; a table that grew to hold the burst and never
   shrank would show here).

Run: ``python -m benchmarks.bench_scale [--tiny | --full] [--backend ...]``.
Quick mode: 100,000 operations on the hot key, a million distinct keys, a burst
of 50,000; ``--full``: a million on the hot key, a burst of 200,000.
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

import anyio

import keybatch

from ._common import LOOPS, parse_args, print_header, print_table, run_on, write_json

HOT_OPS = {"tiny": 2000, "quick": 100_000, "full": 1_000_000}
KEYS = {"tiny": 2000, "quick": 1_000_000, "full": 1_000_000}
BURST = {"tiny": 1000, "quick": 50_000, "full": 200_000}
CALLERS = {"tiny": 100, "quick": 1000, "full": 1000}
HOUR = 3600.0
TARGET_B = 300
BACK_BLOCKS = 1000
BACK_OBJECTS = 500


def burst_bound(workers: int) -> int:
    """What a burst may leave behind, whatever its size: 64 KiB of allocator
    noise, plus 10 KiB per worker: what CPython keeps of a drained deque (up to
    16 free 528-byte blocks) and the worker's current wait (its event, sleep and
    trap objects, made after the baseline). It depends on the workers, never on
    the keys."""
    return 64 * 1024 + workers * 10 * 1024


def bump(resource: dict[str, int]) -> int:
    resource["n"] += 1
    return resource["n"]


async def _settle(min_wait: float = 0.05) -> int:
    """Yield until traced memory stops moving (the workers are idle); return it."""
    await anyio.sleep(min_wait)
    last, still = -1, 0
    while still < 3:
        await anyio.sleep(0.01)
        now = tracemalloc.get_traced_memory()[0]
        still = still + 1 if now == last else 0
        last = now
    return last


async def hot_key(n: int) -> dict[str, float]:
    """Bytes per operation pending on one key inside an open window."""

    async def load(key: str) -> dict[str, int]:
        return {"n": 0}

    async def save(key: str, resource: dict[str, int]) -> None:
        pass

    out: dict[str, float] = {}
    async with keybatch.open_processor(load=load, save=save, min_duration=HOUR) as proc:
        proc.submit("hot", bump)  # opens the batch: loaded, window open
        tracemalloc.start()
        await _settle()
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        objects = len(gc.get_objects())
        for _ in range(n):
            proc.submit("hot", bump)
        out["queued_B"] = (tracemalloc.get_traced_memory()[0] - base) / n
        out["applied_B"] = (await _settle() - base) / n
        out["objects_per_op"] = (len(gc.get_objects()) - objects) / n
        out["pending"] = proc.statistics().pending_operations
        await proc.flush()
        gc.collect()
        out["left_B"] = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
    return out


async def distinct_keys(nkeys: int, callers: int, burst: int) -> dict[str, float]:
    """What is left after ``nkeys`` distinct keys went through ``run``."""

    async def load(key: str) -> dict[str, int]:
        return {"n": 0}

    async def save(key: str, resource: dict[str, int]) -> None:
        pass

    async def push(proc: Any, prefix: str, count: int) -> None:
        each = count // callers

        async def caller(index: int) -> None:
            for j in range(each):
                await proc.run(f"{prefix}{index + j * callers}", bump)

        async with anyio.create_task_group() as tg:
            for index in range(callers):
                tg.start_soon(caller, index)

    out: dict[str, float] = {}
    async with keybatch.open_processor(
        load=load, save=save, min_duration=0, max_duration=None
    ) as proc:
        await push(proc, "warm-", 10 * callers)  # the same shape, small
        gc.collect()
        blocks = sys.getallocatedblocks()
        objects = len(gc.get_objects())
        began = time.process_time()
        await push(proc, "key-", nkeys)
        out["cpu_us_per_key"] = (time.process_time() - began) / nkeys * 1e6
        gc.collect()
        out["pushed"] = nkeys // callers * callers
        out["left_blocks"] = sys.getallocatedblocks() - blocks
        out["left_objects"] = len(gc.get_objects()) - objects
        # A burst: ``burst`` distinct keys pending at once, then flushed. Traced,
        # in bytes: a table that grew to hold them and never shrinks shows here.
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for i in range(burst):
            proc.submit(f"burst-{i}", bump)
        out["burst_pending_B"] = (tracemalloc.get_traced_memory()[0] - base) / burst
        await proc.flush()
        gc.collect()
        out["burst_left_B"] = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        out["stats_keys"] = proc.statistics().keys
        out["workers"] = proc.statistics().workers
    return out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(__doc__.splitlines()[0], argv, loops=LOOPS, default="all")
    n, nkeys, callers = HOT_OPS[args.mode], KEYS[args.mode], CALLERS[args.mode]
    print_header(
        f"memory: {n:,} pending ops on a hot key, {nkeys:,} distinct keys", args
    )
    results: list[dict[str, Any]] = []
    hot_rows, key_rows = [], []
    for loop in args.backends:
        hot = run_on(loop, hot_key, n)
        worst = max(hot["queued_B"], hot["applied_B"])
        hot_rows.append(
            [
                loop,
                n,
                hot["queued_B"],
                hot["applied_B"],
                hot["objects_per_op"],
                hot["left_B"] / 1024,
                f"<= {TARGET_B}: " + ("met" if worst <= TARGET_B else "MISSED"),
            ]
        )
        dk = run_on(loop, distinct_keys, nkeys, callers, BURST[args.mode])
        back = (
            dk["left_blocks"] <= BACK_BLOCKS
            and dk["left_objects"] <= BACK_OBJECTS
            and dk["burst_left_B"] <= burst_bound(int(dk["workers"]))
            and dk["stats_keys"] == 0
        )
        key_rows.append(
            [
                loop,
                int(dk["pushed"]),
                dk["cpu_us_per_key"],
                int(dk["left_blocks"]),
                int(dk["left_objects"]),
                dk["burst_pending_B"],
                dk["burst_left_B"] / 1024,
                int(dk["stats_keys"]),
                "yes" if back else "NO",
            ]
        )
        results.append(
            {"backend": loop, "hot_key": hot, "distinct_keys": dk, "back": back}
        )
    print(
        f"a hot key inside an open window ({HOUR:g} s): bytes per pending operation"
        " (tracemalloc), queued and once applied into the batch"
    )
    print_table(
        [
            "loop",
            "ops",
            "B/op queued",
            "B/op applied",
            "objects/op",
            "left KiB",
            "target",
        ],
        hot_rows,
    )
    print(
        f"distinct keys through run ({callers} callers, one operation per batch):"
        " memory blocks and gc objects left over the baseline after gc.collect();"
        f" then a burst of {BURST[args.mode]:,} distinct keys pending at once"
        " (tracemalloc), flushed; back = under"
        f" {BACK_BLOCKS} blocks, {BACK_OBJECTS} objects and (burst) 64 KiB +"
        " 10 KiB per worker left, no keys held"
    )
    print_table(
        [
            "loop",
            "keys",
            "CPU us/key",
            "left blocks",
            "left objects",
            "burst B/pending",
            "burst left KiB",
            "keys held",
            "back",
        ],
        key_rows,
    )
    write_json(args.json, "scale", args, results)
    return results


if __name__ == "__main__":
    main()
