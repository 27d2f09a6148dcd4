"""The demo: keybatch against one database transaction per operation.

``python -m keybatch.demo`` needs no argument and no server. Many concurrent
clients deposit to and withdraw from a few hot accounts stored in SQLite (a
temporary file, WAL mode, ``synchronous=NORMAL``, every transaction committed),
for a fixed time, twice: once through a keybatch processor (load the balance row,
apply every deposit and withdrawal of the batch, write back once with an
optimistic version check), once the usual way (one transaction per operation).
It prints operations per second, database transactions, p50/p99 latency, the
speed-up, and a consistency check of the final balances against the operations
that succeeded. ``--db postgresql://...`` runs it on PostgreSQL instead
(``pip install 'keybatch[postgres]'``).

The database is only reached from worker threads (``anyio.to_thread``), through a
small pool of connections (one for SQLite, which has a single writer anyway), so
the event loop never blocks. Built on keybatch's public API only.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import random
import sqlite3
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TextIO, TypeVar

import anyio

import keybatch

__all__ = [
    "Account",
    "DemoResult",
    "Overdraft",
    "Progress",
    "RunResult",
    "main",
    "parse_args",
    "run_demo",
]

T = TypeVar("T")

INITIAL_BALANCE = 500
MAX_AMOUNT = 100
PG_CONNECTIONS = 8


class Overdraft(Exception):
    """A withdrawal larger than the balance; the operation is refused."""


class VersionConflict(Exception):
    """The row changed since it was loaded; the write-back is refused."""


class DemoError(Exception):
    """The demo cannot run (bad --db, a missing optional dependency)."""


@dataclass
class Account:
    """One account row as loaded, plus the ledger entries applied to it since."""

    id: str
    balance: int
    version: int
    entries: list[int] = field(default_factory=list)

    def apply(self, amount: int) -> int:
        """Deposit (amount > 0) or withdraw (amount < 0); return the new balance.

        Raises:
            Overdraft: The withdrawal is larger than the balance; nothing changes.
        """
        if self.balance + amount < 0:
            raise Overdraft(f"{self.id}: balance {self.balance}, withdrawal {-amount}")
        self.balance += amount
        self.entries.append(amount)
        return self.balance


# --- The database: SQL and the functions that run in worker threads ---------


@dataclass(frozen=True)
class _Dialect:
    name: str
    placeholder: str
    begin: str  # starts a write transaction
    lock_row: str  # appended to the SELECT of one transaction per operation

    def sql(self, text: str) -> str:
        return text.replace("?", self.placeholder)


SQLITE = _Dialect("SQLite", "?", "BEGIN IMMEDIATE", "")
POSTGRES = _Dialect("PostgreSQL", "%s", "BEGIN", " FOR UPDATE")


def _setup(conn: Any, d: _Dialect, keys: int, initial: int) -> list[str]:
    ids = [f"acct-{i:04d}" for i in range(keys)]
    cur = conn.cursor()
    cur.execute(d.begin)
    try:
        cur.execute("DROP TABLE IF EXISTS demo_ledger")
        cur.execute("DROP TABLE IF EXISTS demo_accounts")
        cur.execute(
            "CREATE TABLE demo_accounts (id TEXT PRIMARY KEY,"
            " balance BIGINT NOT NULL CHECK (balance >= 0), version BIGINT NOT NULL)"
        )
        cur.execute("CREATE TABLE demo_ledger (account TEXT NOT NULL, amount INTEGER)")
        cur.executemany(
            d.sql("INSERT INTO demo_accounts VALUES (?, ?, 0)"),
            [(i, initial) for i in ids],
        )
    except BaseException:
        cur.execute("ROLLBACK")
        raise
    cur.execute("COMMIT")
    if d is SQLITE:
        cur.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return ids


def _select(cur: Any, d: _Dialect, account_id: str, lock: str = "") -> Account:
    cur.execute(
        d.sql("SELECT balance, version FROM demo_accounts WHERE id = ?") + lock,
        (account_id,),
    )
    row = cur.fetchone()
    if row is None:
        raise LookupError(f"no account {account_id!r}")
    return Account(account_id, int(row[0]), int(row[1]))


def _write_back(cur: Any, d: _Dialect, account: Account) -> None:
    cur.execute(
        d.sql(
            "UPDATE demo_accounts SET balance = ?, version = version + 1"
            " WHERE id = ? AND version = ?"
        ),
        (account.balance, account.id, account.version),
    )
    if cur.rowcount != 1:
        raise VersionConflict(f"{account.id} changed since version {account.version}")
    cur.executemany(
        d.sql("INSERT INTO demo_ledger (account, amount) VALUES (?, ?)"),
        [(account.id, amount) for amount in account.entries],
    )


def _load_tx(conn: Any, d: _Dialect, account_id: str) -> Account:
    # One read transaction (autocommit: the SELECT is its own transaction).
    return _select(conn.cursor(), d, account_id)


def _save_tx(conn: Any, d: _Dialect, key: str, account: Account) -> None:
    cur = conn.cursor()
    cur.execute(d.begin)
    try:
        _write_back(cur, d, account)
    except BaseException:
        cur.execute("ROLLBACK")
        raise
    cur.execute("COMMIT")


def _op_tx(conn: Any, d: _Dialect, account_id: str, amount: int) -> int:
    # The naive way: lock, read, apply, write, commit, for every operation.
    cur = conn.cursor()
    cur.execute(d.begin)
    try:
        account = _select(cur, d, account_id, d.lock_row)
        balance = account.apply(amount)
        _write_back(cur, d, account)
    except BaseException:
        cur.execute("ROLLBACK")
        raise
    cur.execute("COMMIT")
    return balance


def _read_state(conn: Any, d: _Dialect) -> tuple[dict[str, int], dict[str, int], int]:
    cur = conn.cursor()
    cur.execute("SELECT id, balance FROM demo_accounts")
    balances = {str(i): int(b) for i, b in cur.fetchall()}
    cur.execute(
        "SELECT account, SUM(amount), COUNT(*) FROM demo_ledger GROUP BY account"
    )
    rows = cur.fetchall()
    return {str(a): int(s) for a, s, _ in rows}, balances, sum(int(n) for *_, n in rows)


class _Store:
    """A pool of connections, each used from one worker thread at a time."""

    def __init__(self, dialect: _Dialect, connections: list[Any], where: str) -> None:
        self.dialect = dialect
        self.where = where
        self.transactions = 0
        self._free = connections
        self._all = list(connections)
        self._limiter = anyio.CapacityLimiter(len(connections))

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(connection, dialect, *args)`` in a worker thread.

        Cancellation: waiting for a connection is cancellable; once the thread
        runs, the call finishes first (the transaction is never cut in half).
        """
        try:
            result = await anyio.to_thread.run_sync(
                self._in_thread, fn, args, limiter=self._limiter
            )
        except Exception:
            self.transactions += 1  # committed nothing, but it ran
            raise
        self.transactions += 1
        return result

    def _in_thread(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn = self._free.pop()  # the limiter guarantees one is free
        try:
            return fn(conn, self.dialect, *args)
        finally:
            self._free.append(conn)

    def close(self) -> None:
        for conn in self._all:
            conn.close()


def _connect_sqlite(path: str) -> _Store:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    return _Store(SQLITE, [conn], f"SQLite {path} (WAL, synchronous=NORMAL)")


def _connect_postgres(url: str) -> _Store:
    try:
        psycopg: Any = importlib.import_module("psycopg")
    except ImportError:
        raise DemoError(
            "--db postgresql://... needs psycopg: pip install 'keybatch[postgres]'"
        ) from None
    try:
        conns = [psycopg.connect(url, autocommit=True) for _ in range(PG_CONNECTIONS)]
    except psycopg.Error as exc:
        raise DemoError(f"cannot connect to PostgreSQL: {exc}") from exc
    host = url.rsplit("@", 1)[-1]  # no password in what we print
    return _Store(POSTGRES, conns, f"PostgreSQL {host} ({PG_CONNECTIONS} connections)")


# --- Progress -----------------------------------------------------------------


class Progress:
    """A live progress line: in place on a terminal, plain periodic lines otherwise.

    Args:
        out: Where to write.
        label: Names the run on each line.
        seconds: Length of the run, for "time left".
        start: The run's start time (the event loop's clock).
        tty: Whether ``out`` is a terminal; default ``out.isatty()``.
    """

    def __init__(
        self,
        out: TextIO,
        label: str,
        seconds: float,
        start: float,
        tty: bool | None = None,
    ) -> None:
        self.out = out
        self.label = label
        self.tty = out.isatty() if tty is None else tty
        self.interval = 0.2 if self.tty else 2.0
        self._start = self._last_time = start
        self._end = start + seconds
        self._last_done = 0
        self._width = 0

    def update(self, done: int, now: float) -> None:
        """Show ``done`` operations at ``now``, and the rate since the last call."""
        elapsed = now - self._last_time
        rate = (done - self._last_done) / elapsed if elapsed > 0 else 0.0
        self._last_done, self._last_time = done, now
        left = max(0.0, self._end - now)
        self._write(
            f"{self.label}: {done:,} operations, {rate:,.0f} ops/s, {left:.1f} s left"
        )

    def finish(self, done: int, now: float) -> None:
        """Show the final count and end the line."""
        line = f"{self.label}: {done:,} operations in {now - self._start:.1f} s"
        self._write(line)
        if self.tty:
            self.out.write("\n")
            self.out.flush()

    def _write(self, line: str) -> None:
        if self.tty:
            self.out.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.out.write(line + "\n")
        self.out.flush()


# --- One run of the workload --------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    """What one run of the workload did, and its consistency check."""

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

    Every account must hold ``initial`` plus the sum of the operations that
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
    clock = anyio.current_time
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
    store: _Store,
    clients: int,
    keys: int,
    seconds: float,
    min_duration: float,
    initial: int,
    out: TextIO,
    tty: bool | None,
    seed: int,
) -> RunResult:
    ids = await store.call(_setup, keys, initial)
    tally = _Tally(ids)
    rng = random.Random(seed)
    store.transactions = 0
    start = anyio.current_time()
    progress = Progress(out, name, seconds, start, tty)

    async def show_progress() -> None:
        while True:
            await anyio.sleep(progress.interval)
            progress.update(tally.done, anyio.current_time())

    async def start_clients(apply: Callable[[str, int], Awaitable[int]]) -> None:
        async with anyio.create_task_group() as clients_tg:
            for _ in range(clients):
                clients_tg.start_soon(_client, apply, tally, ids, rng, start + seconds)

    async with anyio.create_task_group() as tg:
        tg.start_soon(show_progress)
        if name == "keybatch":
            async with keybatch.open_processor(
                load=partial(store.call, _load_tx),
                save=partial(store.call, _save_tx),
                min_duration=min_duration,
                max_duration=max(5.0, 2 * min_duration),
            ) as processor:

                async def run(account: str, amount: int) -> int:
                    return await processor.run(account, Account.apply, amount)

                await start_clients(run)
        else:
            await start_clients(partial(store.call, _op_tx))
        tg.cancel_scope.cancel()
    elapsed = anyio.current_time() - start
    progress.finish(tally.done, start + elapsed)
    transactions = store.transactions
    ledger, balances, rows = await store.call(_read_state)
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


# --- Both runs, the table, the command line ------------------------------------


@dataclass(frozen=True)
class DemoResult:
    """Both runs of the demo, side by side."""

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
        db: A SQLite file path, a ``postgresql://`` URL, or None for a SQLite
            file in a new temporary directory. The demo (re)creates the tables
            ``demo_accounts`` and ``demo_ledger`` there.
        out: Where progress goes (default ``sys.stdout``).
        tty: Force the progress style; default ``out.isatty()``.
        initial_balance: Every account's balance at the start of each run.
        seed: Seeds the clients' random choices.

    Returns:
        Both runs' results; ``result.table()`` renders them.

    Raises:
        DemoError: ``db`` is a PostgreSQL URL and psycopg is missing or the
            server cannot be reached.

    Cancellation: stops the clients; operations in flight finish or are
    withdrawn, connections are closed and a temporary directory is removed.
    """
    out = sys.stdout if out is None else out
    tmpdir: str | None = None
    if db is not None and db.startswith(("postgresql://", "postgres://")):
        store = await anyio.to_thread.run_sync(_connect_postgres, db)
    else:
        if db is None:
            tmpdir = await anyio.to_thread.run_sync(tempfile.mkdtemp)
            db = os.path.join(tmpdir, "demo.db")
        store = await anyio.to_thread.run_sync(_connect_sqlite, db)
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
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the demo's command line (``sys.argv[1:]`` by default)."""
    parser = argparse.ArgumentParser(
        prog="python -m keybatch.demo",
        description=(
            "Many clients deposit to and withdraw from a few hot accounts, through"
            " keybatch and then with one database transaction per operation;"
            " prints throughput, transactions, latency and a consistency check."
        ),
    )
    parser.add_argument("--clients", type=_positive_int, default=1000)
    parser.add_argument("--keys", type=_positive_int, default=20, help="hot accounts")
    parser.add_argument(
        "--seconds", type=_seconds, default=10.0, help="length of each run"
    )
    parser.add_argument(
        "--min-duration",
        type=_seconds,
        default=DEFAULT_MIN_DURATION,
        help="keybatch's batch window in seconds (0: batch what piled up)",
    )
    parser.add_argument("--backend", choices=("trio", "asyncio"), default="trio")
    parser.add_argument(
        "--db",
        default=None,
        help=(
            "a SQLite file or a postgresql:// URL (needs keybatch[postgres]);"
            " the tables demo_accounts and demo_ledger are recreated."
            " Default: a SQLite file in a temporary directory"
        ),
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo from the command line; return the exit status.

    0 when both runs are consistent, 1 when a consistency check failed, 2 when
    the demo could not run.
    """
    args = parse_args(argv)
    demo = partial(
        run_demo,
        args.clients,
        args.keys,
        args.seconds,
        min_duration=args.min_duration,
        db=args.db,
    )
    try:
        result = anyio.run(demo, backend=args.backend)
    except DemoError as exc:
        print(f"keybatch.demo: {exc}", file=sys.stderr)
        return 2
    print()
    print(result.table())
    return 0 if result.consistent else 1


if __name__ == "__main__":
    sys.exit(main())
