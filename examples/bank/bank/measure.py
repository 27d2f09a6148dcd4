"""Measurements of the bank service (scripts, not tests).

    python -m bank.measure single     # one process: keybatch vs one transaction
                                      # per request, 200 and 1,000 connections (wrk)
    python -m bank.measure scale      # 1 -> 2 processes behind nginx (wrk)
    python -m bank.measure failover   # kill -9 one process mid-run (load test)
    python -m bank.measure pg-restart # restart PostgreSQL mid-run (load test)

Each starts what it needs (a throwaway PostgreSQL with `--own-postgres`, the
default here, the app processes, nginx), on 127.0.0.1 only, and stops it after
a bounded run. wrk (Debian's package) drives the throughput runs; the failover
runs use bank.loadtest, which checks the database afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from .cluster import Cluster, open_cluster
from .loadtest import check, run_load

WRK_SCRIPT = """\
-- Deposits of 1 on BANK_ACCOUNTS accounts, each with a fresh Idempotency-Key.
local accounts = tonumber(os.getenv("BANK_ACCOUNTS") or "100")
local prefix = os.getenv("BANK_PREFIX") or "w"
local threads = {}
local counter = 0

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(os.time() * 100 + tid)
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  wrk.headers["Idempotency-Key"] = prefix .. "-" .. tid .. "-" .. counter
  local path = "/accounts/" .. prefix .. math.random(1, accounts) .. "/deposit"
  return wrk.format("POST", path, nil, '{"amount": 1}')
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "seconds": %.3f, "p50_ms": %.1f, "p99_ms": %.1f,'
    .. ' "non_2xx": %d, "socket_errors": %d}\\n',
    summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    e.status, e.connect + e.read + e.write + e.timeout))
end
"""


def wrk(
    url: str, connections: int, seconds: float, accounts: int, prefix: str
) -> dict[str, Any]:
    binary = shutil.which("wrk")
    if binary is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT)
    try:
        out = subprocess.run(
            [
                binary,
                "-t2",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "10s",
                "-s",
                f.name,
                url,
            ],
            env={**os.environ, "BANK_ACCOUNTS": str(accounts), "BANK_PREFIX": prefix},
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        ).stdout
    finally:
        os.unlink(f.name)
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line[len("RESULT ") :])
    result["errors"] = result["non_2xx"] + result["socket_errors"]
    result["req_per_s"] = round(result["requests"] / result["seconds"], 1)
    return result


def stats(cluster: Cluster) -> list[dict[str, Any]]:
    found = []
    for app in cluster.apps:
        if app.process.poll() is None:
            with urllib.request.urlopen(app.url + "/stats", timeout=5) as r:
                found.append(json.loads(r.read()))
    return found


def conflict_share(cluster: Cluster) -> dict[str, Any]:
    saves = conflicts = 0
    for s in stats(cluster):
        saves += s["store"]["saves"]
        conflicts += s["store"]["conflicts"]
    return {
        "saves": saves,
        "conflicts": conflicts,
        "conflict_share": round(conflicts / saves, 5) if saves else 0.0,
    }


def single(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for mode in args.modes:
        env = {"BANK_MODE": mode, "BANK_WORKERS": str(args.workers), **args.env}
        for connections in args.connections:
            # A fresh process (and database) per cell: /stats covers this run.
            with open_cluster(
                1, own_postgres=args.own_postgres, env=env, nginx=False
            ) as cluster:
                wrk(cluster.url, 50, 2, args.accounts, f"warm{connections}")
                result = wrk(
                    cluster.url,
                    connections,
                    args.seconds,
                    args.accounts,
                    f"{mode}{connections}x",
                )
                row = {"mode": mode, "connections": connections, **result}
                found = stats(cluster)[0]
                row["responses"] = found["responses"]
                row["causes"] = found["causes"]
                if mode == "keybatch":
                    row["batches"] = found["batches"]
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def scale(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for apps in (1, 2):
        env = {"BANK_WORKERS": str(args.workers), **args.env}
        with open_cluster(apps, own_postgres=args.own_postgres, env=env) as cluster:
            for connections in args.connections:
                wrk(cluster.url, 50, 2, args.accounts, f"warm{apps}x{connections}")
                before = conflict_share(cluster)
                result = wrk(
                    cluster.url,
                    connections,
                    args.seconds,
                    args.accounts,
                    f"s{apps}x{connections}",
                )
                after = conflict_share(cluster)
                saves = after["saves"] - before["saves"]
                conflicts = after["conflicts"] - before["conflicts"]
                row = {
                    "processes": apps,
                    "connections": connections,
                    **result,
                    "saves": saves,
                    "conflicts": conflicts,
                    "conflict_share": round(conflicts / saves, 5) if saves else 0.0,
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def failover(args: argparse.Namespace) -> dict[str, Any]:
    env = {"BANK_WORKERS": str(args.workers), **args.env}
    with open_cluster(2, own_postgres=args.own_postgres, env=env) as cluster:
        events: dict[str, float] = {}

        async def scenario() -> Any:
            start = time.monotonic()
            load = asyncio.create_task(
                run_load(
                    cluster.url,
                    seconds=args.seconds,
                    connections=args.clients,
                    accounts=args.accounts,
                )
            )
            await asyncio.sleep(args.seconds / 3)
            cluster.apps[0].kill()
            events["killed"] = time.monotonic() - start
            await asyncio.sleep(args.seconds / 3)
            await asyncio.to_thread(cluster.restart_app, 0)
            events["restarted"] = time.monotonic() - start
            return await load

        result = asyncio.run(scenario())
        shares = conflict_share(cluster)  # the survivor and the restarted one
        replays = sum(s["processor"].get("conflicts", 0) for s in stats(cluster))
        report = {
            **result.summary(),
            **check(result, cluster.dsn, cluster.schema),
            **shares,
            "processor_conflicts": replays,
            **{k: round(v, 2) for k, v in events.items()},
        }
    print(json.dumps(report, indent=2))
    return report


def pg_restart(args: argparse.Namespace) -> dict[str, Any]:
    env = {"BANK_WORKERS": str(args.workers), **args.env}
    with open_cluster(2, own_postgres=True, env=env) as cluster:
        pg = cluster.postgres
        assert pg is not None
        events: dict[str, float] = {}

        async def scenario() -> Any:
            start = time.monotonic()
            load = asyncio.create_task(
                run_load(
                    cluster.url,
                    seconds=args.seconds,
                    connections=args.clients,
                    accounts=args.accounts,
                )
            )
            await asyncio.sleep(args.seconds / 3)
            events["db_stopping"] = time.monotonic() - start
            await asyncio.to_thread(pg.stop, "fast")
            events["db_stopped"] = time.monotonic() - start
            await asyncio.sleep(args.down)
            await asyncio.to_thread(pg.start)
            events["db_back"] = time.monotonic() - start
            return await load

        result = asyncio.run(scenario())
        back = events["db_back"]
        ok_after = sorted(
            t
            for s in result.sent
            for t, status in s.attempts
            if status == 200
            if t >= back
        )
        failed_late = Counter(
            str(status)
            for s in result.sent
            for t, status in s.attempts
            if status != 200 and t > back + 1.0 and status != 409
        )
        report = {
            **result.summary(),
            **check(result, cluster.dsn, cluster.schema),
            **{k: round(v, 3) for k, v in events.items()},
            "first_success_after_db_back_s": (
                round(ok_after[0] - back, 3) if ok_after else None
            ),
            "failures_later_than_1s_after_db_back": dict(failed_late),
        }
    print(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["single", "scale", "failover", "pg-restart"])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--connections", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--clients", type=int, default=100, help="load test clients")
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--down", type=float, default=1.0, help="PostgreSQL down (s)")
    parser.add_argument(
        "--shared-postgres",
        dest="own_postgres",
        action="store_false",
        help="use the server at DATABASE_URL when one answers",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="app setting, e.g. BANK_MIN_DURATION=0.05 (repeatable)",
    )
    parser.add_argument(
        "--modes", nargs="+", default=["direct", "keybatch"], help="single: modes"
    )
    parser.add_argument("--out", type=Path, help="append the results (JSON) here")
    args = parser.parse_args(argv)
    args.env = dict(item.split("=", 1) for item in args.env)
    run = {
        "single": single,
        "scale": scale,
        "failover": failover,
        "pg-restart": pg_restart,
    }[args.what]
    result = run(args)
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps({"what": args.what, "result": result}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
