"""Where accounts live: PostgreSQL through asyncpg (asyncio) or psycopg (threads).

Both stores keep the same two tables and the same rules:

- `load` reads the account row and the applied requests whose idempotency keys
  are in flight in this process (`watch`), so an operation can tell a retry
  from a new request.
- `save` writes the balance only if the row still has the version `load` read
  (`UPDATE ... WHERE version = $old`), and inserts the batch's applied requests,
  in one transaction. If the version moved, or one of those requests was already
  stored (a retry that raced its first attempt), it writes nothing and raises
  `keybatch.Conflict`: keybatch loads again and re-applies the batch.

Every query is parameterized; the only text put into SQL is the schema name,
which is checked against a strict pattern first.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.to_thread

import keybatch

from .model import Account, Record, Reply, apply

__all__ = ["AsyncpgStore", "PsycopgStore", "Store", "check_schema"]

_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def check_schema(schema: str) -> str:
    if not _SCHEMA.fullmatch(schema):
        raise ValueError(f"not a plain schema name: {schema!r}")
    return schema


def _ddl(schema: str) -> list[str]:
    return [
        f'CREATE SCHEMA IF NOT EXISTS "{schema}"',
        f'CREATE TABLE IF NOT EXISTS "{schema}".accounts ('
        " id text PRIMARY KEY,"
        " balance bigint NOT NULL CHECK (balance >= 0),"
        " version bigint NOT NULL)",
        # One row per applied request that carried an Idempotency-Key. Kept
        # forever here; a real service deletes rows older than its retry window.
        f'CREATE TABLE IF NOT EXISTS "{schema}".requests ('
        " account text NOT NULL,"
        " key text NOT NULL,"
        " request_hash text NOT NULL,"
        " delta bigint NOT NULL,"
        " response text NOT NULL,"
        " created timestamptz NOT NULL DEFAULT now(),"
        " PRIMARY KEY (account, key))",
    ]


class Store:
    """What the app needs from a store; counts saves and conflicts."""

    def __init__(self, schema: str) -> None:
        self.schema = check_schema(schema)
        self.accounts = f'"{schema}".accounts'
        self.requests = f'"{schema}".requests'
        self._inflight: dict[str, Counter[str]] = {}
        # Shown in pg_stat_activity: tests terminate exactly these backends.
        self.application_name = f"bank:{schema}"
        self.saves = 0  # save attempts that reached the database
        self.conflicts = 0  # of which refused for a moved version or a retry
        self.connection_errors = 0

    @contextmanager
    def watch(self, account: str, key: str | None) -> Iterator[None]:
        """While a request with this key is in flight, loads fetch its record."""
        if key is None:
            yield
            return
        keys = self._inflight.setdefault(account, Counter())
        keys[key] += 1
        try:
            yield
        finally:
            keys[key] -= 1
            if not keys[key]:
                del keys[key]
                if not keys:
                    del self._inflight[account]

    def _watched(self, account: str) -> list[str]:
        return list(self._inflight.get(account, ()))

    def statistics(self) -> dict[str, int]:
        return {
            "saves": self.saves,
            "conflicts": self.conflicts,
            "connection_errors": self.connection_errors,
        }

    async def open(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    async def load(self, account_id: str) -> Account:
        raise NotImplementedError

    async def save(self, account_id: str, account: Account) -> None:
        raise NotImplementedError

    async def direct(
        self, account_id: str, kind: str, amount: int, key: str | None, rhash: str
    ) -> Reply:
        """One transaction per request, without keybatch: the baseline."""
        raise NotImplementedError(f"{type(self).__name__} has no direct mode")

    async def balance(self, account_id: str) -> int:
        raise NotImplementedError


# --- asyncpg ---------------------------------------------------------------


class AsyncpgStore(Store):
    """asyncpg's pool, asyncio only. Its queries can be cancelled mid-flight.

    The batch deadline cancels a load or save wherever it is. A save cancelled
    after it sent COMMIT may have landed: keybatch then raises `SaveError` with
    `may_have_landed=True`, and the app answers 500 (retry with the same
    Idempotency-Key).

    After PostgreSQL restarts, every pooled connection is dead. The first error
    that says so expires the whole pool, so the next batches connect afresh
    instead of each finding its own dead connection.
    """

    def __init__(self, dsn: str, schema: str = "bank", size: int = 16) -> None:
        super().__init__(schema)
        self.dsn = dsn
        self.size = size
        self.pool: Any = None

    async def open(self) -> None:
        import asyncpg

        self._asyncpg = asyncpg
        self._connection_errors = (
            asyncpg.PostgresConnectionError,
            asyncpg.InterfaceError,
            asyncpg.exceptions.OperatorInterventionError,  # terminated, shutdown
            asyncpg.exceptions.CannotConnectNowError,
            OSError,
        )
        self.pool = await asyncpg.create_pool(
            self.dsn,
            min_size=1,
            max_size=self.size,
            command_timeout=10,
            # Statements are prepared per connection; a fresh connection after
            # a restart prepares them again.
            max_inactive_connection_lifetime=60,
            server_settings={"application_name": self.application_name},
        )
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('bank ddl'))")
            for statement in _ddl(self.schema):
                await conn.execute(statement)

    async def aclose(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def _broken(self, exc: BaseException) -> bool:
        if isinstance(exc, self._connection_errors):
            self.connection_errors += 1
            await self.pool.expire_connections()  # returns at once
            return True
        return False

    async def load(self, account_id: str) -> Account:
        try:
            return await self._load(account_id)
        except Exception as exc:
            if not await self._broken(exc):
                raise
        # A read is safe to repeat: once, on a fresh connection.
        return await self._load(account_id)

    async def _load(self, account_id: str) -> Account:
        async with self.pool.acquire() as conn:
            return await self._read(conn, account_id, self._watched(account_id))

    async def _read(
        self, conn: Any, account_id: str, keys: list[str], lock: bool = False
    ) -> Account:
        row = await conn.fetchrow(
            f"SELECT balance, version FROM {self.accounts} WHERE id = $1"
            + (" FOR UPDATE" if lock else ""),
            account_id,
        )
        account = Account(account_id)
        if row is not None:
            account.balance, account.version = row["balance"], row["version"]
        if keys:
            for key, rhash, delta, response in await conn.fetch(
                f"SELECT key, request_hash, delta, response FROM {self.requests}"
                " WHERE account = $1 AND key = ANY($2::text[])",
                account_id,
                keys,
            ):
                account.known[key] = Record(rhash, delta, response)
        return account

    async def save(self, account_id: str, account: Account) -> None:
        if not account.dirty:
            return  # only reads, or only retries of stored requests
        self.saves += 1
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await self._write(conn, account_id, account)
        except keybatch.Conflict:
            self.conflicts += 1
            raise
        except Exception as exc:
            await self._broken(exc)
            raise

    async def _write(self, conn: Any, account_id: str, account: Account) -> None:
        if account.version == 0:
            status = await conn.execute(
                f"INSERT INTO {self.accounts} (id, balance, version)"
                " VALUES ($1, $2, 1) ON CONFLICT (id) DO NOTHING",
                account_id,
                account.balance,
            )
        else:
            status = await conn.execute(
                f"UPDATE {self.accounts} SET balance = $2, version = version + 1"
                " WHERE id = $1 AND version = $3",
                account_id,
                account.balance,
                account.version,
            )
        if status.endswith(" 0"):
            raise keybatch.Conflict(f"account {account_id!r} moved since it was loaded")
        if account.new:
            keys = list(account.new)
            records = [account.new[k] for k in keys]
            status = await conn.execute(
                f"INSERT INTO {self.requests}"
                " (account, key, request_hash, delta, response)"
                " SELECT $1, * FROM unnest($2::text[], $3::text[], $4::bigint[],"
                " $5::text[]) ON CONFLICT DO NOTHING",
                account_id,
                keys,
                [r.request_hash for r in records],
                [r.delta for r in records],
                [r.response for r in records],
            )
            if int(status.rsplit(" ", 1)[1]) != len(keys):
                # A retry raced its first attempt, which is stored already:
                # write nothing; the replay's load will see the stored record.
                raise keybatch.Conflict(
                    f"a request on {account_id!r} was already applied"
                )

    async def direct(
        self, account_id: str, kind: str, amount: int, key: str | None, rhash: str
    ) -> Reply:
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                # Lock the row first: a retry racing its first attempt waits
                # here, then sees the first attempt's stored record.
                account = await self._read(conn, account_id, [], lock=True)
                if account.version == 0 and kind == "deposit":
                    await conn.execute(
                        f"INSERT INTO {self.accounts} (id, balance, version)"
                        " VALUES ($1, 0, 1) ON CONFLICT (id) DO NOTHING",
                        account_id,
                    )
                    account = await self._read(conn, account_id, [], lock=True)
                if key is not None:
                    row = await conn.fetchrow(
                        f"SELECT request_hash, delta, response FROM {self.requests}"
                        " WHERE account = $1 AND key = $2",
                        account_id,
                        key,
                    )
                    if row is not None:
                        account.known[key] = Record(*row)
                reply = apply(account, kind, amount, key, rhash)
                if account.dirty:
                    self.saves += 1
                    await self._write(conn, account_id, account)
                return reply
        except Exception as exc:
            await self._broken(exc)
            raise

    async def balance(self, account_id: str) -> int:
        async with self.pool.acquire() as conn:
            value = await conn.fetchval(
                f"SELECT balance FROM {self.accounts} WHERE id = $1", account_id
            )
        return int(value or 0)


# --- psycopg in threads ----------------------------------------------------


class PsycopgStore(Store):
    """psycopg 3 with psycopg_pool's ConnectionPool, in worker threads.

    Runs on trio and asyncio alike (psycopg's own async API is asyncio only).
    A thread cannot be cancelled: the load is abandoned at the batch deadline
    (a read: nothing is lost), the save is waited for, so its outcome is known,
    and `statement_timeout` bounds it. Connections killed by a PostgreSQL
    restart or `pg_terminate_backend` are found at the first error, and then
    all replaced at once (`pool.check()`); a load that met one is tried again.
    While the server is down, the pool reconnects in the background with a
    backoff that starts at one second and doubles.
    """

    def __init__(
        self,
        dsn: str,
        schema: str = "bank",
        size: int = 16,
        statement_timeout_ms: int = 5000,
    ) -> None:
        super().__init__(schema)
        self.dsn = dsn
        self.size = size
        self.statement_timeout_ms = statement_timeout_ms
        self.pool: Any = None
        # One thread per connection: a load or save never waits for a thread
        # while holding nothing, and never holds a thread waiting for a
        # connection.
        self.limiter = anyio.CapacityLimiter(size)

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self._open, limiter=self.limiter)

    def _open(self) -> None:
        from psycopg_pool import ConnectionPool

        self.pool = ConnectionPool(
            self.dsn,
            min_size=self.size,
            max_size=self.size,
            open=False,
            timeout=10,
            kwargs={
                "application_name": self.application_name,
                "options": f"-c statement_timeout={self.statement_timeout_ms}",
            },
        )
        self.pool.open(wait=True, timeout=30)
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('bank ddl'))")
            for statement in _ddl(self.schema):
                conn.execute(statement)

    async def aclose(self) -> None:
        if self.pool is not None:
            await anyio.to_thread.run_sync(self.pool.close, limiter=self.limiter)

    async def load(self, account_id: str) -> Account:
        return await anyio.to_thread.run_sync(
            self._load,
            account_id,
            self._watched(account_id),
            abandon_on_cancel=True,
            limiter=self.limiter,
        )

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        import psycopg

        try:
            with self.pool.connection() as conn:
                yield conn
        except psycopg.OperationalError:
            # The server restarted, or killed backends: test every idle
            # connection now and replace the dead ones, rather than letting
            # each of them fail a batch. (The pool's own `check=` option tests
            # on every checkout, and after a failed test waits a second or
            # more before the next: too slow to recover within a second.)
            self.connection_errors += 1
            self.pool.check()
            raise

    def _load(self, account_id: str, keys: list[str]) -> Account:
        import psycopg

        try:
            return self._read(account_id, keys)
        except psycopg.OperationalError:
            return self._read(account_id, keys)  # a read is safe to repeat

    def _read(self, account_id: str, keys: list[str]) -> Account:
        with self._connection() as conn:
            row = conn.execute(
                f"SELECT balance, version FROM {self.accounts} WHERE id = %s",
                (account_id,),
            ).fetchone()
            account = Account(account_id)
            if row is not None:
                account.balance, account.version = row
            if keys:
                for key, rhash, delta, response in conn.execute(
                    f"SELECT key, request_hash, delta, response FROM {self.requests}"
                    " WHERE account = %s AND key = ANY(%s)",
                    (account_id, keys),
                ):
                    account.known[key] = Record(rhash, delta, response)
        return account

    async def save(self, account_id: str, account: Account) -> None:
        if not account.dirty:
            return
        self.saves += 1
        try:
            await anyio.to_thread.run_sync(
                self._save, account_id, account, limiter=self.limiter
            )
        except keybatch.Conflict:
            self.conflicts += 1
            raise

    def _save(self, account_id: str, account: Account) -> None:
        # pool.connection() commits on a normal exit and rolls back when the
        # block raises, Conflict included.
        with self._connection() as conn:
            if account.version == 0:
                cursor = conn.execute(
                    f"INSERT INTO {self.accounts} (id, balance, version)"
                    " VALUES (%s, %s, 1) ON CONFLICT (id) DO NOTHING",
                    (account_id, account.balance),
                )
            else:
                cursor = conn.execute(
                    f"UPDATE {self.accounts} SET balance = %s,"
                    " version = version + 1 WHERE id = %s AND version = %s",
                    (account.balance, account_id, account.version),
                )
            if cursor.rowcount != 1:
                raise keybatch.Conflict(
                    f"account {account_id!r} moved since it was loaded"
                )
            if account.new:
                rows = [
                    (account_id, key, r.request_hash, r.delta, r.response)
                    for key, r in account.new.items()
                ]
                cursor = conn.execute(
                    f"INSERT INTO {self.requests}"
                    " (account, key, request_hash, delta, response)"
                    " SELECT * FROM unnest(%s::text[], %s::text[], %s::text[],"
                    " %s::bigint[], %s::text[]) ON CONFLICT DO NOTHING",
                    [list(column) for column in zip(*rows, strict=True)],
                )
                if cursor.rowcount != len(rows):
                    raise keybatch.Conflict(
                        f"a request on {account_id!r} was already applied"
                    )

    async def balance(self, account_id: str) -> int:
        def read() -> int:
            with self.pool.connection() as conn:
                row = conn.execute(
                    f"SELECT balance FROM {self.accounts} WHERE id = %s",
                    (account_id,),
                ).fetchone()
            return 0 if row is None else int(row[0])

        return await anyio.to_thread.run_sync(read, limiter=self.limiter)
