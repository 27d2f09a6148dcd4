"""The demo's bank: accounts, and the SQL that runs in worker threads.

Everything here but `Store` is synchronous and runs in a worker thread,
on a connection of SQLite (`sqlite3`) or PostgreSQL (psycopg 3, imported only
when asked for). Both are used in autocommit mode with explicit transactions.
"""

from __future__ import annotations

import importlib
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

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
class Dialect:
    name: str
    placeholder: str
    begin: str  # starts a write transaction
    lock_row: str  # appended to the SELECT of one transaction per operation

    def sql(self, text: str) -> str:
        return text.replace("?", self.placeholder)


SQLITE = Dialect("SQLite", "?", "BEGIN IMMEDIATE", "")
POSTGRES = Dialect("PostgreSQL", "%s", "BEGIN", " FOR UPDATE")


def setup(conn: Any, d: Dialect, keys: int, initial: int) -> list[str]:
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


def _select(cur: Any, d: Dialect, account_id: str, lock: str = "") -> Account:
    cur.execute(
        d.sql("SELECT balance, version FROM demo_accounts WHERE id = ?") + lock,
        (account_id,),
    )
    row = cur.fetchone()
    if row is None:
        raise LookupError(f"no account {account_id!r}")
    return Account(account_id, int(row[0]), int(row[1]))


def _write_back(cur: Any, d: Dialect, account: Account) -> None:
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


def load_tx(conn: Any, d: Dialect, account_id: str) -> Account:
    # One read transaction (autocommit: the SELECT is its own transaction).
    return _select(conn.cursor(), d, account_id)


def save_tx(conn: Any, d: Dialect, key: str, account: Account) -> None:
    cur = conn.cursor()
    cur.execute(d.begin)
    try:
        _write_back(cur, d, account)
    except BaseException:
        cur.execute("ROLLBACK")
        raise
    cur.execute("COMMIT")


def op_tx(conn: Any, d: Dialect, account_id: str, amount: int) -> int:
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


def read_state(conn: Any, d: Dialect) -> tuple[dict[str, int], dict[str, int], int]:
    cur = conn.cursor()
    cur.execute("SELECT id, balance FROM demo_accounts")
    balances = {str(i): int(b) for i, b in cur.fetchall()}
    cur.execute(
        "SELECT account, SUM(amount), COUNT(*) FROM demo_ledger GROUP BY account"
    )
    rows = cur.fetchall()
    return {str(a): int(s) for a, s, _ in rows}, balances, sum(int(n) for *_, n in rows)


class Store:
    """A pool of connections, each used from one worker thread at a time."""

    def __init__(self, dialect: Dialect, connections: list[Any], where: str) -> None:
        self.dialect = dialect
        self.where = where
        self.transactions = 0
        self._free = connections
        self._all = list(connections)
        self._limiter = anyio.CapacityLimiter(len(connections))

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(connection, dialect, *args)` in a worker thread.

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


def connect_sqlite(path: str) -> Store:
    """Open a SQLite file: WAL journal, `synchronous=NORMAL`, autocommit."""
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
    except sqlite3.Error as exc:
        raise DemoError(f"cannot open the SQLite database {path}: {exc}") from exc
    return Store(SQLITE, [conn], f"SQLite {path} (WAL, synchronous=NORMAL)")


def connect_postgres(url: str) -> Store:
    """Open a pool of PostgreSQL connections (psycopg 3, autocommit)."""
    try:
        psycopg: Any = importlib.import_module("psycopg")
    except ImportError:
        raise DemoError(
            "--db postgresql://... needs psycopg: pip install 'psycopg[binary]'"
        ) from None
    try:
        conns = [psycopg.connect(url, autocommit=True) for _ in range(PG_CONNECTIONS)]
    except psycopg.Error as exc:
        raise DemoError(f"cannot connect to PostgreSQL: {exc}") from exc
    host = url.rsplit("@", 1)[-1]  # no password in what we print
    return Store(POSTGRES, conns, f"PostgreSQL {host} ({PG_CONNECTIONS} connections)")
