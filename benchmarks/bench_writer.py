"""keybatch.writer against a plain list-and-timer writer: items per second.

One producer task writes N items as fast as it can, spread over ``keys`` keys;
the sink is in memory (it does not wait), so the figures are the writers' own
cost. The clock runs from the first write to the end of the ``async with``
block, when everything was flushed. In the same run, in the same process:

- ``keybatch``: ``keybatch.writer.open_writer(sink, batch_size=...)``, default
  options otherwise (``flush_interval`` 1 s, 2 concurrent flushes);
- ``plain``: a minimal writer: a dict of lists; a full list goes to one flusher
  task, which also flushes everything once a second (the timer); nothing else:
  no retries, no backpressure, no statistics, no dependencies, no write_sync.

``write`` is ``await writer.write(item, key=...)`` (a checkpoint per item in
both writers); ``nowait`` is ``writer.write_nowait(...)`` against a bare append.
Each figure is the best of a few interleaved repetitions, by CPU time of the
process. Run: ``python -m benchmarks.bench_writer [--tiny | --full]
[--backend trio|asyncio]``.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio

from keybatch.writer import open_writer

from ._common import now, parse_args, print_header, print_table, run_on, write_json

# (how, keys, batch_size) cells per mode
GRIDS: dict[str, list[tuple[str, int, int]]] = {
    "tiny": [("write", 1, 100), ("nowait", 10, 100)],
    "quick": [
        (how, keys, batch)
        for how in ("write", "nowait")
        for keys in (1, 100)
        for batch in (100, 5000)
    ],
    "full": [
        (how, keys, batch)
        for how in ("write", "nowait")
        for keys in (1, 10, 1000)
        for batch in (10, 100, 5000)
    ],
}
ITEMS = {"tiny": 2000, "quick": 30_000, "full": 200_000}
REPEATS = {"tiny": 1, "quick": 3, "full": 3}
IMPLS = ("keybatch", "plain")


class PlainWriter:
    """A dict of lists, a flusher task, and a timer."""

    def __init__(self, sink: Any, batch_size: int, interval: float) -> None:
        self.sink = sink
        self.batch_size = batch_size
        self.interval = interval
        self.buffers: dict[Any, list[Any]] = {}
        self.full: list[tuple[Any, list[Any]]] = []
        self.wakeup = anyio.Event()
        self.closing = False

    def write_nowait(self, item: Any, key: Any = None) -> None:
        buffer = self.buffers.get(key)
        if buffer is None:
            buffer = self.buffers[key] = []
        buffer.append(item)
        if len(buffer) >= self.batch_size:
            del self.buffers[key]
            self.full.append((key, buffer))
            self.wakeup.set()

    async def write(self, item: Any, key: Any = None) -> None:
        await anyio.lowlevel.checkpoint()
        self.write_nowait(item, key)

    async def flusher(self) -> None:
        deadline = anyio.current_time() + self.interval
        while True:
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                await self.wakeup.wait()
            self.wakeup = anyio.Event()
            full, self.full = self.full, []
            for key, items in full:
                await self.sink(key, items)
            if self.closing or anyio.current_time() >= deadline:
                buffers, self.buffers = self.buffers, {}
                for key, items in buffers.items():
                    await self.sink(key, items)
                deadline = anyio.current_time() + self.interval
                if self.closing:
                    return


@asynccontextmanager
async def plain_writer(sink: Any, batch_size: int) -> AsyncIterator[PlainWriter]:
    writer = PlainWriter(sink, batch_size, 1.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.flusher)
        yield writer
        writer.closing = True
        writer.wakeup.set()


async def measure(
    impl: str, how: str, nkeys: int, batch_size: int, n: int
) -> tuple[float, float]:
    """Wall and CPU seconds to write ``n`` items and close the writer."""
    written = 0

    async def sink(key: Any, items: list[int]) -> None:
        nonlocal written
        written += len(items)

    keys = list(range(nkeys))
    if impl == "keybatch":
        context: Any = open_writer(sink, batch_size=batch_size, max_buffered=n + 1)
    else:
        context = plain_writer(sink, batch_size)
    started, started_cpu = now(), time.process_time()
    async with context as writer:
        if how == "write":
            write = writer.write
            for i in range(n):
                await write(i, key=keys[i % nkeys])
        else:
            write_nowait = writer.write_nowait
            for i in range(n):
                write_nowait(i, key=keys[i % nkeys])
    elapsed, elapsed_cpu = now() - started, time.process_time() - started_cpu
    if written != n:  # the benchmark must not lie
        raise AssertionError(f"{impl}: wrote {written} of {n}")
    return elapsed, elapsed_cpu


def run_cell(
    backend: str, how: str, nkeys: int, batch_size: int, mode: str
) -> dict[str, float]:
    n = ITEMS[mode]
    best: dict[str, float] = {}
    for _ in range(REPEATS[mode]):
        for impl in IMPLS:  # interleaved, so drift hits both
            wall, cpu = run_on(backend, measure, impl, how, nkeys, batch_size, n)
            best[impl] = max(best.get(impl, 0.0), n / cpu if cpu else math.inf)
            best[f"{impl}_wall"] = max(best.get(f"{impl}_wall", 0.0), n / wall)
    return best


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(__doc__.splitlines()[0], argv)
    print_header("writer against a plain list-and-timer writer, in-memory sink", args)
    print(
        f"   {ITEMS[args.mode]} items; k items/s by CPU time (best of"
        f" {REPEATS[args.mode]}); ratio = keybatch / plain (higher is better"
        " for keybatch); wall = the same ratio in wall-clock time"
    )
    results = []
    rows = []
    for backend in args.backends:
        for how, nkeys, batch_size in GRIDS[args.mode]:
            r = run_cell(backend, how, nkeys, batch_size, args.mode)
            results.append(
                {
                    "backend": backend,
                    "how": how,
                    "keys": nkeys,
                    "batch_size": batch_size,
                    **r,
                }
            )
            rows.append(
                [
                    backend,
                    how,
                    nkeys,
                    batch_size,
                    r["keybatch"] / 1000,
                    r["plain"] / 1000,
                    r["keybatch"] / r["plain"],
                    r["keybatch_wall"] / r["plain_wall"],
                ]
            )
    print_table(
        [
            "backend",
            "how",
            "keys",
            "batch",
            "keybatch k/s",
            "plain k/s",
            "ratio",
            "wall ratio",
        ],
        rows,
    )
    write_json(args.json, "writer", args, results)
    return results


if __name__ == "__main__":
    main()
