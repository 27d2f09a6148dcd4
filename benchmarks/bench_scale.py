"""Scale: a million distinct keys pushed through; memory per pending operation.

Three measurements per event loop, in one process:

1. Throughput: 1000 callers (100 with --tiny) await ``run`` on distinct keys
   until every key was used once (every batch holds one operation: the worst
   case for per-batch bookkeeping), next to the hand-written floor of
   bench_overhead on the same keys.
2. Memory (tracemalloc, Python allocations): ``submit`` N operations without
   letting the workers run, on N distinct keys and then on one key, and divide
   the growth by N: the bytes each pending operation costs. Then the peak
   while the callers push N distinct keys through ``run``.
3. After each step, once the work is done: memory must be back at the baseline
   taken after opening the processor (the processor keeps no per-key state), up
   to a bound that depends on workers and callers, not on the keys
   (slack_bytes).

Run: ``python -m benchmarks.bench_scale [--tiny | --full] [--backend ...]``.
Quick mode pushes 200,000 keys; ``--full`` one million.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Sequence
from typing import Any

import anyio

import keybatch

from ._common import parse_args, print_header, print_table, run_on, write_json
from .bench_overhead import add, measure

KEYS = {"tiny": 2000, "quick": 200_000, "full": 1_000_000}
CALLERS = {"tiny": 100, "quick": 1000, "full": 1000}
# Memory left over after the work that still counts as "back at the baseline",
# whatever the number of keys: 64 KiB of allocator noise, per worker what CPython
# keeps of a drained deque (up to 16 free 528-byte blocks), and per caller task
# what the event loop's own tables (run queue, task sets) keep after growing to
# hold them all. It depends on workers and callers, never on the keys.
WORKERS = 32


def slack_bytes(callers: int) -> int:
    return 64 * 1024 + WORKERS * 16 * 528 + callers * 512


async def memory(nkeys: int, callers: int) -> dict[str, float]:
    """Bytes per pending op, peak of a run, and what is left after each step."""
    keys = [f"key-{i}" for i in range(nkeys)]
    store: dict[str, list[int]] = {}

    async def load(key: str) -> list[int]:
        return [0]

    async def save(key: str, resource: list[int]) -> None:
        pass

    out: dict[str, float] = {}
    async with keybatch.open_processor(
        load=load, save=save, min_duration=0, workers=WORKERS
    ) as proc:
        for key in ("warm-up-1", "warm-up-2"):  # lazily made objects, caches
            await proc.run(key, add, 1)
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]

        for i in range(nkeys):
            proc.submit(keys[i], add, 1)  # the Pending is kept by the batch
        out["pending_distinct_B"] = (tracemalloc.get_traced_memory()[0] - base) / nkeys
        await proc.flush()
        gc.collect()
        out["left_after_distinct_B"] = tracemalloc.get_traced_memory()[0] - base

        for _ in range(nkeys):
            proc.submit("one-key", add, 1)
        out["pending_one_key_B"] = (tracemalloc.get_traced_memory()[0] - base) / nkeys
        await proc.flush()
        gc.collect()
        out["left_after_one_key_B"] = tracemalloc.get_traced_memory()[0] - base

        tracemalloc.reset_peak()
        per_caller = nkeys // callers

        async def caller(i: int) -> None:
            for j in range(per_caller):
                await proc.run(keys[i + j * callers], add, 1)

        async with anyio.create_task_group() as tg:
            for i in range(callers):
                tg.start_soon(caller, i)
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
        out["run_peak_B"] = peak - base
        out["left_after_run_B"] = current - base
        out["stats_keys"] = proc.statistics().keys
        tracemalloc.stop()
    del store
    return out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(__doc__.splitlines()[0], argv)
    nkeys = KEYS[args.mode]
    callers = CALLERS[args.mode]
    print_header(f"scale: {nkeys:,} distinct keys", args)
    keys = [f"key-{i}" for i in range(nkeys)]
    results: list[dict[str, Any]] = []
    speed_rows = []
    mem_rows = []
    for backend in args.backends:
        t: dict[str, float] = {}
        for impl in ("keybatch", "floor"):
            wall, cpu, _ = run_on(
                backend, measure, impl, backend, callers, keys, 0.0, nkeys // callers
            )
            t[impl], t[f"{impl}_cpu"] = wall, cpu
        pushed = callers * (nkeys // callers)
        speed_rows.append(
            [
                backend,
                pushed,
                pushed / t["keybatch"],
                pushed / t["floor"],
                t["keybatch_cpu"] / pushed * 1e6,
                t["floor_cpu"] / pushed * 1e6,
                t["keybatch_cpu"] / t["floor_cpu"],
            ]
        )
        mem = run_on(backend, memory, nkeys, callers)
        back = all(
            mem[k] <= slack_bytes(callers)
            for k in (
                "left_after_distinct_B",
                "left_after_one_key_B",
                "left_after_run_B",
            )
        )
        mem_rows.append(
            [
                backend,
                mem["pending_distinct_B"],
                mem["pending_one_key_B"],
                mem["run_peak_B"] / 2**20,
                mem["left_after_distinct_B"] / 1024,
                mem["left_after_one_key_B"] / 1024,
                mem["left_after_run_B"] / 1024,
                "yes" if back and mem["stats_keys"] == 0 else "NO",
            ]
        )
        results.append(
            {
                "backend": backend,
                "keys": pushed,
                "keybatch_ops_per_s": pushed / t["keybatch"],
                "floor_ops_per_s": pushed / t["floor"],
                **mem,
                "back_to_baseline": back,
            }
        )
    print("throughput, one operation per key (every batch holds one operation):")
    print_table(
        [
            "loop",
            "keys",
            "kb ops/s",
            "floor ops/s",
            "kb CPU us/op",
            "floor",
            "kb/floor (CPU)",
        ],
        speed_rows,
    )
    print("memory (tracemalloc), bytes per pending operation and what is left:")
    print_table(
        [
            "loop",
            "B/pending, distinct keys",
            "B/pending, one key",
            "run peak MiB",
            "left KiB (distinct)",
            "(one key)",
            "(run)",
            "baseline",
        ],
        mem_rows,
    )
    write_json(args.json, "scale", args, results)
    return results


if __name__ == "__main__":
    main()
