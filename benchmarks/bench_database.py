"""A real database: the demo's workload, keybatch against one transaction per op.

Runs the demo's `run_demo` (examples/demo: clients deposit to and withdraw from a
few hot accounts, SQLite in a temporary file, reached from a worker thread) and
reports both runs side by side: operations per second, the speed-up, database
transactions, latency, and the demo's consistency check. Both runs of a row use
the same process, database and parameters, one after the other.

With ``KEYBATCH_PG_DSN`` set (a ``postgresql://`` URL; needs
``pip install -r examples/demo/requirements.txt``), the same rows run on
PostgreSQL too; benchmarks/README.md says how to start a throw-away server on
loopback.

Run: ``python -m benchmarks.bench_database [--tiny | --full] [--backend ...]``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

from examples.demo.keybatch_demo import DemoError, run_demo

from ._common import parse_args, print_header, print_table, run_on, write_json

# (clients, keys, min_duration) per mode, and seconds per run.
GRIDS: dict[str, list[tuple[int, int, float]]] = {
    "tiny": [(20, 4, 0.0)],
    "quick": [(100, 20, 0.0), (1000, 20, 0.0), (1000, 20, 0.01)],
    "full": [
        (c, k, md) for md in (0.0, 0.01) for c in (100, 1000, 10000) for k in (20, 1000)
    ],
}
SECONDS = {"tiny": 0.3, "quick": 3.0, "full": 10.0}


def databases() -> list[tuple[str, str | None]]:
    """(label, db argument of run_demo): SQLite always, PostgreSQL if configured."""
    dbs: list[tuple[str, str | None]] = [("sqlite", None)]
    dsn = os.environ.get("KEYBATCH_PG_DSN")
    if dsn:
        dbs.append(("postgresql", dsn))
    return dbs


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(__doc__.splitlines()[0], argv)
    print_header("database: keybatch against one transaction per operation", args)
    seconds = SECONDS[args.mode]
    print(f"   {seconds:g} s per run; ops/s counts every finished operation")
    results: list[dict[str, Any]] = []
    rows = []
    for label, db in databases():
        for clients, keys, md in GRIDS[args.mode]:
            for backend in args.backends:
                try:
                    res = run_on(
                        backend,
                        _run,
                        clients,
                        keys,
                        seconds,
                        md,
                        db,
                    )
                except DemoError as exc:
                    print(f"{label}: skipped: {exc}")
                    break
                k, n = res.keybatch, res.naive
                ok = "ok" if res.consistent else "FAILED"
                rows.append(
                    [
                        label,
                        backend,
                        clients,
                        keys,
                        f"{md * 1000:g}",
                        k.ops_per_second,
                        n.ops_per_second,
                        res.speedup,
                        k.transactions,
                        n.transactions,
                        k.p50 * 1000,
                        k.p99 * 1000,
                        n.p50 * 1000,
                        n.p99 * 1000,
                        ok,
                    ]
                )
                results.append(
                    {
                        "database": label,
                        "backend": backend,
                        "clients": clients,
                        "keys": keys,
                        "min_duration": md,
                        "seconds": seconds,
                        "keybatch_ops_per_s": k.ops_per_second,
                        "naive_ops_per_s": n.ops_per_second,
                        "speedup": res.speedup,
                        "keybatch_transactions": k.transactions,
                        "naive_transactions": n.transactions,
                        "keybatch_p50_ms": k.p50 * 1000,
                        "keybatch_p99_ms": k.p99 * 1000,
                        "naive_p50_ms": n.p50 * 1000,
                        "naive_p99_ms": n.p99 * 1000,
                        "consistent": res.consistent,
                    }
                )
                if not res.consistent:
                    print(res.table())
    print_table(
        [
            "db",
            "loop",
            "clients",
            "keys",
            "min ms",
            "kb ops/s",
            "1tx ops/s",
            "speed-up",
            "kb tx",
            "1tx tx",
            "kb p50 ms",
            "kb p99",
            "1tx p50",
            "1tx p99",
            "check",
        ],
        rows,
    )
    write_json(args.json, "database", args, results)
    if any(not r["consistent"] for r in results):
        raise SystemExit("consistency check FAILED")
    return results


async def _run(
    clients: int, keys: int, seconds: float, min_duration: float, db: str | None
) -> Any:
    return await run_demo(
        clients,
        keys,
        seconds,
        min_duration=min_duration,
        db=db,
        out=io.StringIO(),  # no progress lines in the benchmark's output
        tty=False,
    )


if __name__ == "__main__":
    main()
