"""The stores (and the docs' PostgreSQL recipe) recover when connections die:
backends terminated with pg_terminate_backend, and a PostgreSQL restart."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from bank.cluster import Postgres, start_postgres

from .conftest import DSN, IN_CI, OpenBank, sql

pytestmark = pytest.mark.anyio

RECIPES = Path(__file__).resolve().parents[3] / "docs" / "recipes.md"
BOTH = pytest.mark.parametrize(
    ("anyio_backend", "store"),
    [("asyncio", "asyncpg"), ("trio", "psycopg"), ("asyncio", "psycopg")],
)


def terminate(dsn: str, application_name: str) -> int:
    rows = sql(
        dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = %s",
        application_name,
    )
    return len(rows)


async def deposit(client: Any, account: str, key: str) -> int:
    r = await client.post(
        f"/accounts/{account}/deposit",
        content=b'{"amount": 1}',
        headers={"Idempotency-Key": key},
    )
    return int(r.status_code)


async def deposit_until_acknowledged(
    client: Any, account: str, key: str, seconds: float
) -> tuple[int, float]:
    """Retry with the same key until 200; returns (failed attempts, when done)."""
    failed = 0
    deadline = time.monotonic() + seconds
    while await deposit(client, account, key) != 200:
        failed += 1
        assert time.monotonic() < deadline, f"{key}: no success in {seconds} s"
        await anyio.sleep(0.02)
    return failed, time.monotonic()


@BOTH
async def test_terminated_backends_are_replaced(
    open_bank: OpenBank, dsn: str, store: str
) -> None:
    async with open_bank(store=store, workers=4) as (client, bank):
        async with anyio.create_task_group() as tg:
            for i in range(20):  # open every connection of the pool
                tg.start_soon(deposit, client, f"r{i % 4}", f"warm{i}")
        assert terminate(dsn, bank.store.application_name) >= 1
        failed = 0
        for i in range(20):
            f, _ = await deposit_until_acknowledged(client, f"r{i % 4}", f"k{i}", 5)
            failed += f
        # A dead connection fails at most the batch that found it.
        assert failed <= 1
        total = 0
        for i in range(4):
            total += (await client.get(f"/accounts/r{i}")).json()["balance"]
        assert total == 40


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[Postgres]:
    """A throwaway cluster that this module may restart (never the shared one)."""
    # Not under pytest's tmp_path: the postgres user must reach the directory.
    root = Path(tempfile.mkdtemp(prefix="bank-pg-"))
    os.chmod(root, 0o755)
    try:
        try:
            pg = start_postgres(root)
        except (FileNotFoundError, OSError, subprocess.CalledProcessError) as exc:
            if IN_CI:
                raise
            pytest.skip(f"cannot start a PostgreSQL cluster here: {exc}")
        yield pg
        pg.stop("immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@BOTH
async def test_the_service_recovers_after_postgresql_restarts(
    open_bank: OpenBank, own_postgres: Postgres, store: str
) -> None:
    async with open_bank(store=store, dsn=own_postgres.dsn, workers=4) as (client, _):
        for i in range(5):
            assert await deposit(client, "s", f"before{i}") == 200
        await anyio.to_thread.run_sync(own_postgres.restart)
        back = time.monotonic()
        _, done = await deposit_until_acknowledged(client, "s", "after0", 10)
        assert done - back < 1.0, f"recovered {done - back:.2f} s after the restart"
        for i in range(1, 5):
            assert await deposit(client, "s", f"after{i}") == 200
        assert (await client.get("/accounts/s")).json()["balance"] == 10


# --- the PostgreSQL recipe in docs/recipes.md ---------------------------------


def recipe_code() -> str:
    text = RECIPES.read_text(encoding="utf-8")
    section = text.split("## PostgreSQL with optimistic versioning", 1)[1]
    match = re.search(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert match, "the PostgreSQL recipe has no code block"
    return match.group(1)


def test_the_postgres_recipe_runs_and_survives_terminated_backends(
    dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYBATCH_PG_DSN", dsn)
    code = compile(recipe_code(), str(RECIPES), "exec", dont_inherit=True)
    exec(code, {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert "every deposit saved: True" in out
    assert re.search(r"after the backends died: \d+", out)
    sql(dsn, "DELETE FROM accounts WHERE key LIKE 'recipe:%'")


def test_the_postgres_recipe_recovers_after_a_restart(own_postgres: Postgres) -> None:
    import trio

    import keybatch

    namespace: dict[str, Any] = {"__name__": "recipe"}
    code = recipe_code().replace("trio.run(main)", "")
    exec(compile(code, str(RECIPES), "exec", dont_inherit=True), namespace)
    store = namespace["PgAccounts"](own_postgres.dsn, connections=4)
    deposit = namespace["Account"].deposit

    async def main() -> float:
        await trio.to_thread.run_sync(store.open)
        try:
            async with keybatch.open_processor(
                load=store.load,
                save=store.save,
                workers=4,
                min_duration=0.01,
                max_duration=2.0,
            ) as processor:
                assert await processor.run("restart", deposit, 1) >= 1
                await trio.to_thread.run_sync(own_postgres.restart)
                back = trio.current_time()
                while True:
                    try:
                        await processor.run("restart", deposit, 1)
                        return trio.current_time() - back
                    except keybatch.BatchError:
                        await trio.sleep(0.02)
        finally:
            await trio.to_thread.run_sync(store.pool.close)

    assert trio.run(main) < 1.0
    assert os.environ.get("DATABASE_URL", DSN)  # the shared server was not touched
