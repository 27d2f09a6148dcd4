"""The bank's tests run against a real PostgreSQL at DATABASE_URL (default
postgresql://postgres@127.0.0.1:5432/test), each test in a schema of its own
that it drops afterwards. Without a server they skip, except in CI (CI=true),
where they fail. Async tests run on asyncio (asyncpg) unless they ask for trio.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from bank.app import Settings, create_app  # noqa: E402
from bank.cluster import postgres_answers  # noqa: E402

DSN = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = bool(os.environ.get("CI"))
_names = itertools.count()


def require_postgres() -> None:
    if not postgres_answers(DSN):
        if IN_CI:
            pytest.fail(f"no PostgreSQL answers at {DSN} (CI must start one)")
        pytest.skip(f"no PostgreSQL at {DSN} (set DATABASE_URL)")


@pytest.fixture(scope="session")
def dsn() -> str:
    require_postgres()
    return DSN


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def sql(dsn: str, statement: str, *args: Any) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(statement, args or None)
        return cursor.fetchall() if cursor.description else []


@pytest.fixture
def schema(dsn: str) -> Iterator[str]:
    name = f"bank_test_{os.getpid()}_{next(_names)}"
    yield name
    sql(dsn, f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


OpenBank = Callable[..., AbstractAsyncContextManager[Any]]


@pytest.fixture
def open_bank(dsn: str, schema: str) -> OpenBank:
    """`async with open_bank(**settings) as (client, bank):` the app in-process,
    its lifespan entered, an httpx client on it."""

    @asynccontextmanager
    async def opened(**overrides: Any) -> AsyncIterator[Any]:
        import httpx

        settings = replace(Settings(dsn=dsn, schema=schema, workers=4), **overrides)
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://bank"
            ) as client:
                yield client, app.state.bank

    return opened
