"""Running the workload both ways, checking it, and the result table."""

from __future__ import annotations

import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TextIO

import anyio

import keybatch

from ._db import (
    INITIAL_BALANCE,
    MAX_AMOUNT,
    Account,
    Overdraft,
    Store,
    connect_postgres,
    connect_sqlite,
    load_tx,
    op_tx,
    read_state,
    save_tx,
    setup,
)
from ._progress import Progress


@dataclass(frozen=True)
class RunResult:
    """What one run of the workload did, and its consistency check.

    Attributes:
        name: `"keybatch"` or `"1 tx per op"`.
        seconds: Real length of the run, operations in flight at the end included.
        operations: Operations finished: succeeded + refused + failed.
        succeeded: Operations applied and saved.
        refused: Withdrawals refused by the operation (`Overdraft`).
        failed: Operations that got a database error (not applied, or not saved).
        transactions: Database transactions made, read-only ones included.
        p50: Median latency of an operation, in seconds.
        p99: 99th percentile latency, in seconds.
        problems: What the consistency check found; empty when consistent.
        errors: The first few database errors, with their causes.
    """

    name: str
    seconds: float
    operations: int
    succeeded: int
    refused: int
    failed: int
    transactions: int
    p50: float
    p99: float
    problems: tuple[str, ...]
    errors: tuple[str, ...]

    @property
    def ops_per_second(self) -> float:
        return self.operations / self.seconds if self.seconds > 0 else 0.0

    @property
    def consistent(self) -> bool:
        return not self.problems


class _Tally:
    def __init__(self, ids: list[str]) -> None:
        self.done = self.succeeded = self.refused = self.failed = 0
        self.sums = dict.fromkeys(ids, 0)
        self.latencies: list[float] = []
        self.errors: list[str] = []


def check(
    initial: int,
    sums: dict[str, int],
    succeeded: int,
    balances: dict[str, int],
    ledger: dict[str, int],
    ledger_rows: int,
) -> list[str]:
    """Compare the database with what the clients were told; return the problems.

    Every account must hold `initial` plus the sum of the operations that
    succeeded on it, must agree with its ledger, and must not be negative; the
    ledger must hold exactly the operations that succeeded (a refused overdraft
    leaves no trace; an accepted one is not lost).
    """
    problems = []
    for account, total in sums.items():
        balance = balances.get(account)
        if balance != initial + total:
            problems.append(
                f"{account}: balance {balance}, expected {initial} + {total}"
            )
        elif balance != initial + ledger.get(account, 0):
            problems.append(f"{account}: balance {balance} disagrees with its ledger")
        elif balance < 0:
            problems.append(f"{account}: negative balance {balance}")
    if ledger_rows != succeeded:
        problems.append(f"ledger holds {ledger_rows} entries, {succeeded} succeeded")
    return problems


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def _client(
    apply: Callable[[str, int], Awaitable[int]],
    tally: _Tally,
    ids: list[str],
    rng: random.Random,
    deadline: float,
) -> None:
    clock = time.perf_counter
    latencies = tally.latencies
    while (start := clock()) < deadline:
        account = rng.choice(ids)
        amount = rng.randint(1, MAX_AMOUNT) * rng.choice((1, -1))
        try:
            await apply(account, amount)
        except Overdraft:
            tally.refused += 1
        except Exception as exc:  # a database error: not succeeded, not lost
            tally.failed += 1
            if len(tally.errors) < 3:
                cause = exc.__cause__
                why = f" ({type(cause).__name__}: {cause})" if cause else ""
                tally.errors.append(f"{type(exc).__name__}: {exc}{why}")
        else:
            tally.succeeded += 1
            tally.sums[account] += amount
        tally.done += 1
        latencies.append(clock() - start)


async def _run_workload(
    name: str,
    store: Store,
    clients: int,
    keys: int,
    seconds: float,
    min_duration: float,
    initial: int,
    out: TextIO,
    tty: bool | None,
    seed: int,
) -> RunResult:
    ids = await store.call(setup, keys, initial)
    tally = _Tally(ids)
    rng = random.Random(seed)
    store.transactions = 0
    start = time.perf_counter()
    progress = Progress(out, name, seconds, start, tty)

    async def show_progress() -> None:
        while True:
            await anyio.sleep(progress.interval)
            progress.update(tally.done, time.perf_counter())

    async def start_clients(apply: Callable[[str, int], Awaitable[int]]) -> None:
        async with anyio.create_task_group() as clients_tg:
            for _ in range(clients):
                clients_tg.start_soon(_client, apply, tally, ids, rng, start + seconds)

    async with anyio.create_task_group() as tg:
        tg.start_soon(show_progress)
        if name == "keybatch":
            async with keybatch.open_processor(
                load=partial(store.call, load_tx),
                save=partial(store.call, save_tx),
                min_duration=min_duration,
                max_duration=max(5.0, 2 * min_duration),
            ) as processor:

                def run(account: str, amount: int) -> Awaitable[int]:
                    return processor.run(account, Account.apply, amount)

                await start_clients(run)
        else:
            await start_clients(partial(store.call, op_tx))
        tg.cancel_scope.cancel()
    elapsed = time.perf_counter() - start
    progress.finish(tally.done, start + elapsed)
    transactions = store.transactions
    ledger, balances, rows = await store.call(read_state)
    problems = check(initial, tally.sums, tally.succeeded, balances, ledger, rows)
    latencies = sorted(tally.latencies)
    return RunResult(
        name=name,
        seconds=elapsed,
        operations=tally.done,
        succeeded=tally.succeeded,
        refused=tally.refused,
        failed=tally.failed,
        transactions=transactions,
        p50=_percentile(latencies, 0.50),
        p99=_percentile(latencies, 0.99),
        problems=tuple(problems),
        errors=tuple(tally.errors),
    )


# --- Both runs and the table -------------------------------------------------


@dataclass(frozen=True)
class DemoResult:
    """Both runs of the demo, side by side; `table()` renders them.

    Attributes:
        clients, keys, seconds, min_duration: The parameters of the runs.
        backend: `"trio"` or `"asyncio"`.
        database: Which database, and how it was set up.
        keybatch: The run through keybatch.
        naive: The run with one transaction per operation.
    """

    clients: int
    keys: int
    seconds: float
    min_duration: float
    backend: str
    database: str
    keybatch: RunResult
    naive: RunResult

    @property
    def speedup(self) -> float:
        """keybatch's operations per second over the naive way's."""
        naive = self.naive.ops_per_second
        return self.keybatch.ops_per_second / naive if naive > 0 else math.inf

    @property
    def consistent(self) -> bool:
        return self.keybatch.consistent and self.naive.consistent

    def table(self) -> str:
        """Render the results as a plain-text table."""
        k, n = self.keybatch, self.naive

        def ms(x: float) -> str:
            return f"{x * 1000:,.1f} ms"

        def per_tx(r: RunResult) -> str:
            return f"{r.operations / r.transactions:,.1f}" if r.transactions else "-"

        rows = [
            ("", "keybatch", "1 transaction per op"),
            (
                "operations per second",
                f"{k.ops_per_second:,.0f}",
                f"{n.ops_per_second:,.0f}",
            ),
            ("operations", f"{k.operations:,}", f"{n.operations:,}"),
            ("  succeeded", f"{k.succeeded:,}", f"{n.succeeded:,}"),
            ("  refused (overdraft)", f"{k.refused:,}", f"{n.refused:,}"),
            ("  failed (database error)", f"{k.failed:,}", f"{n.failed:,}"),
            ("database transactions", f"{k.transactions:,}", f"{n.transactions:,}"),
            ("operations per transaction", per_tx(k), per_tx(n)),
            ("latency p50", ms(k.p50), ms(n.p50)),
            ("latency p99", ms(k.p99), ms(n.p99)),
            (
                "consistency check",
                "ok" if k.consistent else "FAILED",
                "ok" if n.consistent else "FAILED",
            ),
        ]
        lines = [
            f"keybatch demo: {self.clients:,} clients, {self.keys:,} hot accounts,"
            f" {self.seconds:g} s per run, min_duration {self.min_duration:g} s,"
            f" {self.backend}",
            f"database: {self.database}",
            "",
        ]
        lines += [f"{a:<28}{b:>14}{c:>24}" for a, b, c in rows]
        lines.append("")
        lines.append(
            f"speed-up: {self.speedup:.1f}x the operations per second of one"
            " transaction per operation"
        )
        if k.transactions:
            lines.append(
                "keybatch's transactions: one read (load) and one write (save)"
                " per batch; saves write the balance with a version check"
            )
        for r in (k, n):
            for problem in r.problems:
                lines.append(f"{r.name}: INCONSISTENT: {problem}")
            for error in r.errors:
                lines.append(f"{r.name}: failed operation: {error}")
        return "\n".join(lines)


def _backend_name() -> str:
    import trio

    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return "asyncio"
    return "trio"


DEFAULT_MIN_DURATION = 0.0


async def run_demo(
    clients: int = 1000,
    keys: int = 20,
    seconds: float = 10.0,
    *,
    min_duration: float = DEFAULT_MIN_DURATION,
    db: str | None = None,
    out: TextIO | None = None,
    tty: bool | None = None,
    initial_balance: int = INITIAL_BALANCE,
    seed: int = 1,
) -> DemoResult:
    """Run the workload through keybatch, then one transaction per operation.

    Args:
        clients: Concurrent clients, each doing one operation after another.
        keys: Hot accounts the clients pick from at random.
        seconds: Length of each run (operations in flight at the end finish).
        min_duration: keybatch's batch window.
        db: A SQLite file path, a `postgresql://` URL, or None for a SQLite
            file in a new temporary directory. The demo (re)creates the tables
            `demo_accounts` and `demo_ledger` there.
        out: Where progress goes (default `sys.stdout`).
        tty: Force the progress style; default `out.isatty()`.
        initial_balance: Every account's balance at the start of each run.
        seed: Seeds the clients' random choices.

    Returns:
        Both runs' results; `result.table()` renders them.

    Raises:
        DemoError: `db` is a PostgreSQL URL and psycopg is missing or the
            server cannot be reached.

    Cancellation: stops the clients; operations in flight finish or are
    withdrawn, connections are closed and a temporary directory is removed.
    """
    out = sys.stdout if out is None else out
    tmpdir: str | None = None
    if db is not None and db.startswith(("postgresql://", "postgres://")):
        store = await anyio.to_thread.run_sync(connect_postgres, db)
    else:
        if db is None:
            tmpdir = await anyio.to_thread.run_sync(tempfile.mkdtemp)
            db = os.path.join(tmpdir, "demo.db")
        store = await anyio.to_thread.run_sync(connect_sqlite, db)
    out.write(
        f"{clients:,} clients deposit and withdraw on {keys:,} hot accounts for"
        f" {seconds:g} s through keybatch, then for {seconds:g} s with one"
        f" transaction per operation; {store.where}\n"
    )
    out.flush()
    try:
        runs = [
            await _run_workload(
                name,
                store,
                clients,
                keys,
                seconds,
                min_duration,
                initial_balance,
                out,
                tty,
                seed,
            )
            for name in ("keybatch", "1 tx per op")
        ]
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(store.close)
            if tmpdir is not None:
                await anyio.to_thread.run_sync(_remove_tree, tmpdir)
    return DemoResult(
        clients=clients,
        keys=keys,
        seconds=seconds,
        min_duration=min_duration,
        backend=_backend_name(),
        database=store.where,
        keybatch=runs[0],
        naive=runs[1],
    )


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
