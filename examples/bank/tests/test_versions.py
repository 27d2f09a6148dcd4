"""Versioned saves: a stale save writes nothing and raises keybatch.Conflict;
keybatch replays it, so two processes on one account stay correct."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from bank.model import apply, request_hash
from bank.stores import AsyncpgStore, PsycopgStore, Store

import keybatch

from .conftest import OpenBank, sql

pytestmark = pytest.mark.anyio

STORES = pytest.mark.parametrize(
    ("anyio_backend", "kind"), [("asyncio", "asyncpg"), ("trio", "psycopg")]
)


def make(kind: str, dsn: str, schema: str) -> Store:
    cls = AsyncpgStore if kind == "asyncpg" else PsycopgStore
    return cls(dsn, schema, size=2)


def rows(dsn: str, schema: str) -> Any:
    return (
        sql(dsn, f'SELECT id, balance, version FROM "{schema}".accounts'),
        sql(dsn, f'SELECT account, key FROM "{schema}".requests ORDER BY 2'),
    )


def deposit(account: Any, amount: int, key: str | None = None) -> Any:
    body = json.dumps({"amount": amount}).encode()
    return apply(account, "deposit", amount, key, request_hash("POST", "/x", body))


@STORES
async def test_a_stale_save_raises_conflict_and_writes_nothing(
    dsn: str, schema: str, kind: str
) -> None:
    one, two = make(kind, dsn, schema), make(kind, dsn, schema)
    await one.open()
    await two.open()
    try:
        # A new row: both load "no row"; the second insert conflicts.
        a, b = await one.load("acct"), await two.load("acct")
        deposit(a, 5)
        deposit(b, 7)
        await one.save("acct", a)
        before = rows(dsn, schema)
        with pytest.raises(keybatch.Conflict):
            await two.save("acct", b)
        assert rows(dsn, schema) == before == ([("acct", 5, 1)], [])

        # An existing row: the version moved between load and save.
        a, b = await one.load("acct"), await two.load("acct")
        deposit(a, 1)
        deposit(b, 2)
        await two.save("acct", b)
        with pytest.raises(keybatch.Conflict):
            await one.save("acct", a)
        assert rows(dsn, schema) == ([("acct", 7, 2)], [])
        assert (one.conflicts, two.conflicts) == (1, 1)
    finally:
        await one.aclose()
        await two.aclose()


@STORES
async def test_a_retry_that_raced_its_first_attempt_conflicts(
    dsn: str, schema: str, kind: str
) -> None:
    """The retry was applied as new (its load did not see the key); the save
    finds the key stored and writes nothing."""
    store = make(kind, dsn, schema)
    await store.open()
    try:
        a = await store.load("acct")
        deposit(a, 5, key="k1")
        await store.save("acct", a)
        stale = await store.load("acct")  # not watching k1: its record not loaded
        deposit(stale, 5, key="k1")
        before = rows(dsn, schema)
        with pytest.raises(keybatch.Conflict):
            await store.save("acct", stale)
        assert rows(dsn, schema) == before == ([("acct", 5, 1)], [("acct", "k1")])
        with store.watch("acct", "k1"):  # the replay's load sees the record
            fresh = await store.load("acct")
        assert deposit(fresh, 5, key="k1").replayed
        assert not fresh.dirty
    finally:
        await store.aclose()


async def test_two_processes_on_one_account_are_replayed_into_agreement(
    open_bank: OpenBank, dsn: str, schema: str
) -> None:
    """Routing gone wrong: two app instances serve the same accounts."""
    statuses: list[int] = []

    async def send(client: Any, i: int) -> None:
        r = await client.post(
            f"/accounts/shared{(i // 2) % 2}/deposit",  # both apps, both accounts
            content=b'{"amount": 1}',
            headers={"Idempotency-Key": f"k{i}"},
        )
        statuses.append(r.status_code)

    async with open_bank() as (one, bank_one), open_bank() as (two, bank_two):
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(send, one if i % 2 else two, i)
                if i % 20 == 0:
                    await anyio.sleep(0.01)
        conflicts = bank_one.store.conflicts + bank_two.store.conflicts
        replays = bank_one.batches.replays + bank_two.batches.replays
    assert statuses == [200] * 200
    assert sql(dsn, f'SELECT sum(balance) FROM "{schema}".accounts') == [(200,)]
    assert sql(dsn, f'SELECT count(*) FROM "{schema}".requests') == [(200,)]
    assert replays == conflicts  # every conflict was replayed, none reached a client
