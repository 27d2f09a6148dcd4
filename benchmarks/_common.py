"""Shared helpers of the benchmarks: command line, backends, timing, tables.

Every benchmark takes ``--tiny`` (a smoke-sized run, for the test suite), nothing
(quick mode) or ``--full``. Figures are printed next to references measured in the
same process, in the same run, as ratios: absolute numbers move with the machine
and with whatever else runs on it, ratios much less.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

BACKENDS = ("trio", "asyncio")
# Every event loop a benchmark can run on (uvloop: asyncio code on a uvloop loop).
LOOPS = ("trio", "asyncio", "uvloop")


def parse_args(
    description: str,
    argv: Sequence[str] | None = None,
    *,
    backends: bool = True,
    loops: Sequence[str] = BACKENDS,
    default: str = "both",
    repeats: bool = False,
) -> argparse.Namespace:
    """The options every benchmark shares; ``args.mode`` is tiny, quick or full.

    ``--backend`` picks one of ``loops`` or all of them ("both" and "all" mean
    every one); ``args.backends`` is the tuple to run. ``repeats=True`` adds
    ``--repeats N`` (``args.repeats``, None when not given).
    """
    parser = argparse.ArgumentParser(description=description)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="smoke-sized run (tests)")
    size.add_argument("--full", action="store_true", help="the long run")
    if backends:
        parser.add_argument(
            "--backend",
            choices=(*loops, "both", "all"),
            default=default,
            help=f"event loop(s) to measure (default: {default})",
        )
    if repeats:
        parser.add_argument(
            "--repeats", type=int, metavar="N", help="repetitions per cell"
        )
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--plot",
        metavar="DIR",
        help="write PNG plots into DIR (needs matplotlib)",
    )
    args = parser.parse_args(argv)
    args.mode = "tiny" if args.tiny else "full" if args.full else "quick"
    if backends:
        every = args.backend in ("both", "all")
        args.backends = tuple(loops) if every else (args.backend,)
    return args


def run_on(backend: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run ``fn(*args)`` in a fresh event loop of ``backend`` (trio, asyncio or
    uvloop); return its value."""
    if backend == "trio":
        return trio.run(fn, *args)
    if backend == "asyncio":
        return asyncio.run(fn(*args))
    if backend == "uvloop":
        import uvloop

        return uvloop.run(fn(*args))
    raise ValueError(f"unknown backend {backend!r}")


def each_cell(
    loops: Sequence[str],
    cells: Sequence[tuple[int, int]],
    run_cell: Callable[..., dict[str, Any]],
    *args: Any,
) -> list[dict[str, Any]]:
    """``run_cell(loop, callers, keys, *args)`` for every loop and cell, in that
    order, saying on stderr which one runs; the results in a list."""
    results: list[dict[str, Any]] = []
    for loop in loops:
        for callers, keys in cells:
            print(
                f"   {loop}: {callers} callers x {keys} keys ...",
                file=sys.stderr,
                flush=True,
            )
            results.append(run_cell(loop, callers, keys, *args))
    return results


def now() -> float:
    return time.perf_counter()


def cpu_now() -> float:
    """CPU time of this process: what the overhead figures use, because other
    processes on a shared machine stretch wall time, not CPU time."""
    return time.process_time()


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def add(resource: list[int], n: int) -> int:
    """An operation: add ``n`` to a one-item list counter; return the new count."""
    resource[0] += n
    return resource[0]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a plain-text table, right-aligned columns."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    sys.stdout.flush()


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def machine() -> dict[str, str]:
    """What ran the benchmark: CPU, cores, Python and library versions."""
    import anyio  # noqa: F401  (version lookup below)

    import keybatch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from importlib.metadata import version

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "os": platform.platform(),
        "python": platform.python_version(),
        "keybatch": keybatch.__version__,
        "keybatch_path": os.path.dirname(keybatch.__file__),
        "trio": version("trio"),
        "anyio": version("anyio"),
    }


def print_header(title: str, args: argparse.Namespace) -> None:
    m = machine()
    print(f"== {title} ({args.mode} mode)")
    print(
        f"   {m['cpu']}, {m['cores']} cores, Python {m['python']}, keybatch"
        f" {m['keybatch']}, trio {m['trio']}, anyio {m['anyio']}"
    )
    print(f"   keybatch imported from {m['keybatch_path']}")
    sys.stdout.flush()


def write_json(
    path: str | None, name: str, args: argparse.Namespace, data: Any
) -> None:
    if not path:
        return
    with open(path, "w") as f:
        json.dump(
            {
                "benchmark": name,
                "mode": args.mode,
                "machine": machine(),
                "results": data,
            },
            f,
            indent=1,
        )


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (imported only when plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
