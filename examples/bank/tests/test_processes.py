"""Real processes: uvicorn and hypercorn apps, nginx in front, signals.

Everything listens on 127.0.0.1; each test's load is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import signal
from collections import defaultdict
from typing import Any

import pytest
from bank.cluster import find_nginx, free_port, open_cluster, start_app
from bank.loadtest import check, run_load

from .conftest import IN_CI, sql


@pytest.fixture
def nginx() -> str:
    try:
        return find_nginx()
    except FileNotFoundError:
        if IN_CI:
            raise
        pytest.skip("nginx is not installed (apt-get install nginx)")


def deposit(client: Any, url: str, account: str, key: str) -> Any:
    return client.post(
        f"{url}/accounts/{account}/deposit",
        content=b'{"amount": 1}',
        headers={"Idempotency-Key": key},
    )


def test_nginx_routes_each_account_to_one_process(
    dsn: str, schema: str, nginx: str
) -> None:
    import httpx

    with (
        open_cluster(2, dsn=dsn, schema=schema, env={"BANK_WORKERS": "4"}) as cluster,
        httpx.Client(timeout=10) as client,
    ):
        pids: dict[str, set[str]] = defaultdict(set)
        for round_ in range(3):
            for i in range(30):
                r = deposit(client, cluster.url, f"acct{i}", f"{round_}-{i}")
                assert r.status_code == 200
                pids[f"acct{i}"].add(r.headers["X-Bank-Pid"])
        assert all(len(p) == 1 for p in pids.values())  # one process per account
        assert len(set().union(*pids.values())) == 2  # and both processes used

        # One process dies: nginx sends its accounts to the other one.
        cluster.apps[0].kill()
        survivor = str(cluster.apps[1].process.pid)
        for i in range(30):
            r = deposit(client, cluster.url, f"acct{i}", f"after-{i}")
            assert r.status_code == 200
            assert r.headers["X-Bank-Pid"] == survivor
        balances = sql(dsn, f'SELECT sum(balance), count(*) FROM "{schema}".accounts')
        assert balances == [(120, 30)]


def test_load_through_nginx_loses_nothing_and_doubles_nothing(
    dsn: str, schema: str, nginx: str
) -> None:
    """A short run of the load test, with a process killed and restarted."""

    async def scenario(cluster: Any) -> Any:
        load = asyncio.create_task(
            run_load(cluster.url, seconds=3, connections=20, accounts=20, seed=1)
        )
        await asyncio.sleep(1)
        cluster.apps[0].kill()  # SIGKILL mid-run: its in-flight requests are lost
        await asyncio.sleep(0.5)
        await asyncio.to_thread(cluster.restart_app, 0)
        return await load

    with open_cluster(2, dsn=dsn, schema=schema, env={"BANK_WORKERS": "4"}) as cluster:
        result = asyncio.run(scenario(cluster))
    report = check(result, dsn, schema)
    summary = result.summary()
    assert report["ok"], (report, summary)
    assert summary["acknowledged"] > 100
    assert summary["unknown_at_end"] == 0


def test_sigterm_finishes_requests_in_flight(dsn: str, schema: str) -> None:
    """uvicorn stops accepting, finishes its requests, then the lifespan closes
    the processor (which saves what it accepted) and the pool."""
    import httpx

    env = {
        "DATABASE_URL": dsn,
        "BANK_SCHEMA": schema,
        "BANK_WORKERS": "4",
        "BANK_MIN_DURATION": "0.5",  # keep the requests in flight a while
        "BANK_MAX_DURATION": "5",
    }
    app = start_app(free_port(), env)

    async def send_then_stop() -> list[int]:
        async with httpx.AsyncClient(
            timeout=10, limits=httpx.Limits(max_connections=100)
        ) as client:
            sends = [
                asyncio.create_task(deposit(client, app.url, f"t{i % 10}", f"k{i}"))
                for i in range(100)
            ]
            await asyncio.sleep(0.3)
            app.process.send_signal(signal.SIGTERM)
            return [r.status_code for r in await asyncio.gather(*sends)]

    try:
        statuses = asyncio.run(send_then_stop())
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert app.process.wait(20) in (0, -signal.SIGTERM)
    finally:
        app.stop()
    assert statuses == [200] * 100
    assert sql(dsn, f'SELECT sum(balance) FROM "{schema}".accounts') == [(100,)]


def test_hypercorn_on_trio(dsn: str, schema: str) -> None:
    import httpx

    env = {"DATABASE_URL": dsn, "BANK_SCHEMA": schema, "BANK_WORKERS": "4"}
    app = start_app(free_port(), env, server="hypercorn")
    try:
        with httpx.Client(timeout=10) as client:
            for i in range(5):
                assert deposit(client, app.url, "trio", f"k{i}").status_code == 200
            r = deposit(client, app.url, "trio", "k0")
            assert r.headers["Idempotent-Replayed"] == "true"
            stats = client.get(f"{app.url}/stats").json()
            assert stats["processor"]["operations_done"] == 6
        app.process.send_signal(signal.SIGTERM)
        assert app.process.wait(20) == 0
    finally:
        app.stop()
    assert sql(dsn, f'SELECT balance FROM "{schema}".accounts') == [(5,)]


def test_cluster_scripts_bind_loopback_only(dsn: str, schema: str, nginx: str) -> None:
    with open_cluster(1, dsn=dsn, schema=schema, env={"BANK_WORKERS": "2"}) as cluster:
        conf = (cluster.root / "nginx" / "nginx.conf").read_text()
        listens = [ln.split()[1] for ln in conf.splitlines() if "listen " in ln]
        assert listens
        assert all(x.startswith("127.0.0.1:") for x in listens)
        assert all(a.url.startswith("http://127.0.0.1:") for a in cluster.apps)
