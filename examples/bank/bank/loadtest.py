"""A load test that checks the database afterwards.

    python -m bank.loadtest --url http://127.0.0.1:8080 --seconds 10

Each client connection sends deposits and withdrawals with a fresh
Idempotency-Key and records every answer. An answer whose outcome is unknown
(500, 502, 504, a dropped connection) is retried with the same key until it
gets a definite one; a share of acknowledged requests is sent again on purpose.
Then the checker reads the database and verifies:

- nothing acknowledged was lost: every key answered 200 is stored;
- nothing was applied twice: each stored key belongs to one request with its
  amount, and each balance is the sum of its stored requests;
- a refused request (409) left nothing;
- every retry of an acknowledged request got the first answer back.

Requests go to the given URL only (loopback); the run is bounded by
`--seconds` and `--max-requests`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

__all__ = ["LoadResult", "Sent", "check", "main", "run_load"]

UNKNOWN = frozenset({500, 502, 504})  # may or may not have been applied
NOT_APPLIED = frozenset({429, 503})  # refused before anything was written


class _Conn:
    """One keep-alive HTTP/1.1 connection: enough of a client for this test."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                self.host, self.port
            )
        assert self.reader is not None
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("closed by the server")
        status = int(status_line.split()[1])
        received: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            received[name.strip().lower()] = value.strip()
        if received.get("transfer-encoding") == "chunked":
            data = bytearray()
            while size := int((await self.reader.readline()).strip(), 16):
                data += await self.reader.readexactly(size)
                await self.reader.readline()
            await self.reader.readline()
            payload = bytes(data)
        else:
            payload = await self.reader.readexactly(
                int(received.get("content-length", "0"))
            )
        if received.get("connection") == "close":
            self.close()
        return status, received, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class Sent:
    """One logical request and every attempt at it."""

    account: str
    kind: str
    amount: int
    key: str
    attempts: list[tuple[float, int | None]] = field(default_factory=list)
    final: int | None = None  # the definite status: 200, 409, 4xx; None: unknown
    body: dict[str, Any] | None = None  # the acknowledged answer
    repeats: int = 0  # acknowledged answers asked for again on purpose
    repeat_mismatches: int = 0

    @property
    def delta(self) -> int:
        return self.amount if self.kind == "deposit" else -self.amount


@dataclass
class LoadResult:
    sent: list[Sent]
    seconds: float
    statuses: Counter[Any]
    latencies: list[float]  # of acknowledged attempts
    accounts: list[str]

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float:
            return (
                round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1) if lat else 0
            )

        acked = sum(1 for s in self.sent if s.final == 200)
        return {
            "requests": len(self.sent),
            "attempts": sum(self.statuses.values()),
            "acknowledged": acked,
            "refused": sum(1 for s in self.sent if s.final == 409),
            "unknown_at_end": sum(1 for s in self.sent if s.final is None),
            "acknowledged_per_s": round(acked / self.seconds, 1),
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=str)},
        }


async def run_load(
    url: str,
    *,
    accounts: int = 50,
    connections: int = 50,
    seconds: float = 5.0,
    max_requests: int = 100_000,
    repeat_share: float = 0.05,
    withdraw_share: float = 0.3,
    grace: float = 20.0,
    prefix: str | None = None,
    seed: int | None = None,
) -> LoadResult:
    """Send load for `seconds`; then finish the unknown outcomes (for `grace` s)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    rng = random.Random(seed)
    prefix = prefix or f"lt{os.getpid()}x{rng.randrange(10**6)}"
    names = [f"{prefix}-{i}" for i in range(accounts)]
    sent: list[Sent] = []
    statuses: Counter[Any] = Counter()
    latencies: list[float] = []
    start = time.monotonic()
    stop_sending = start + seconds
    give_up = stop_sending + grace
    counter = 0

    async def attempt(conn: _Conn, s: Sent) -> tuple[int | None, dict[str, str], bytes]:
        t0 = time.monotonic()
        try:
            status, headers, payload = await asyncio.wait_for(
                conn.request(
                    "POST",
                    f"/accounts/{s.account}/{s.kind}",
                    json.dumps({"amount": s.amount}).encode(),
                    {"Idempotency-Key": s.key, "Content-Type": "application/json"},
                ),
                10.0,
            )
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            conn.close()
            status, headers, payload = None, {}, b""
        now = time.monotonic()
        s.attempts.append((now - start, status))
        statuses[status] += 1
        if status == 200:
            latencies.append(now - t0)
        return status, headers, payload

    async def client(index: int) -> None:
        nonlocal counter
        conn = _Conn(host, port)
        try:
            while time.monotonic() < stop_sending and counter < max_requests:
                counter += 1
                s = Sent(
                    rng.choice(names),
                    "withdraw" if rng.random() < withdraw_share else "deposit",
                    rng.randint(1, 100),
                    f"{prefix}-{index}-{counter}",
                )
                sent.append(s)
                while True:
                    status, _, payload = await attempt(conn, s)
                    if status is not None and status not in UNKNOWN | NOT_APPLIED:
                        s.final = status
                        if status == 200:
                            s.body = json.loads(payload)
                        break
                    if time.monotonic() > give_up:
                        break
                    # Not applied, or unknown: retry with the same key.
                    await asyncio.sleep(0.02 + rng.random() * 0.03)
                if s.final == 200 and rng.random() < repeat_share:
                    status, headers, payload = await attempt(conn, s)
                    if status == 200:
                        s.repeats += 1
                        if (
                            json.loads(payload) != s.body
                            or headers.get("idempotent-replayed") != "true"
                        ):
                            s.repeat_mismatches += 1
        finally:
            conn.close()

    await asyncio.gather(*(client(i) for i in range(connections)))
    return LoadResult(sent, stop_sending - start, statuses, latencies, names)


def check(result: LoadResult, dsn: str, schema: str) -> dict[str, Any]:
    """Compare what the clients were told with what the database holds."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        stored = {
            key: (account, delta)
            for key, account, delta in conn.execute(
                f'SELECT key, account, delta FROM "{schema}".requests'
                " WHERE account = ANY(%s)",
                (result.accounts,),
            )
        }
        balances: dict[str, int] = dict(
            conn.execute(
                f'SELECT id, balance FROM "{schema}".accounts WHERE id = ANY(%s)',
                (result.accounts,),
            ).fetchall()
        )
    by_key = {s.key: s for s in result.sent}
    lost = [s.key for s in result.sent if s.final == 200 and s.key not in stored]
    refused_but_stored = [
        s.key for s in result.sent if s.final == 409 and s.key in stored
    ]
    foreign = [
        k
        for k, (account, delta) in stored.items()
        if k not in by_key or (by_key[k].account, by_key[k].delta) != (account, delta)
    ]
    sums: Counter[str] = Counter()
    for account, delta in stored.values():
        sums[account] += delta
    wrong_balances = {
        a: (balances.get(a, 0), sums[a])
        for a in result.accounts
        if balances.get(a, 0) != sums[a]
    }
    unknown = [s for s in result.sent if s.final is None]
    return {
        "lost": len(lost),
        "applied_twice_or_wrong_balance": len(wrong_balances),
        "refused_but_stored": len(refused_but_stored),
        "stored_without_request": len(foreign),
        "repeat_mismatches": sum(s.repeat_mismatches for s in result.sent),
        "repeats": sum(s.repeats for s in result.sent),
        "retried_after_unknown": sum(
            1
            for s in result.sent
            if any(st is None or st in UNKNOWN for _, st in s.attempts)
        ),
        "unknown_at_end": len(unknown),
        "unknown_at_end_stored": sum(1 for s in unknown if s.key in stored),
        "ok": not (lost or refused_but_stored or foreign or wrong_balances)
        and not any(s.repeat_mismatches for s in result.sent),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument(
        "--dsn",
        default=os.environ.get(
            "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--schema", default="bank")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--accounts", type=int, default=50)
    parser.add_argument("--max-requests", type=int, default=200_000)
    args = parser.parse_args(argv)
    if urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("this load test sends to loopback addresses only")
    result = asyncio.run(
        run_load(
            args.url,
            accounts=args.accounts,
            connections=args.connections,
            seconds=args.seconds,
            max_requests=args.max_requests,
        )
    )
    report = {**result.summary(), **check(result, args.dsn, args.schema)}
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
