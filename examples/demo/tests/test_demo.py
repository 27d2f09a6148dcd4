"""The demo: both runs on a real SQLite file, the consistency check, progress, CLI.

The runs use a real database reached through a worker thread, so they take real
time (a few tenths of a second each, tiny sizes); nothing here asserts a speed.
The PostgreSQL run uses DATABASE_URL (default: the local test server); it may
skip only outside CI.
"""

from __future__ import annotations

import importlib
import io
import os
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
from keybatch_demo import (
    Account,
    DemoResult,
    Overdraft,
    Progress,
    _workload,
    check,
    main,
    parse_args,
    run_demo,
)
from keybatch_demo._db import save_tx


def assert_sound(result: DemoResult) -> None:
    for run in (result.keybatch, result.naive):
        assert run.problems == ()
        assert run.errors == ()
        assert run.failed == 0
        assert run.succeeded > 0
        assert run.succeeded + run.refused == run.operations
        assert run.transactions > 0
        assert 0 < run.p50 <= run.p99
    # The naive way is one transaction per operation, refused ones included.
    assert result.naive.transactions == result.naive.operations
    assert result.consistent
    table = result.table()
    assert "consistency check" in table
    assert table.count(" ok") == 2
    assert "speed-up: " in table
    assert "INCONSISTENT" not in table


@pytest.mark.anyio
async def test_both_runs_are_consistent_on_trio(tmp_path: Path) -> None:
    out = io.StringIO()
    db = tmp_path / "demo.db"
    # Balances start at 0: the first withdrawal on each account is refused.
    result = await run_demo(
        20, 3, 0.2, db=str(db), out=out, initial_balance=0, min_duration=0
    )
    assert_sound(result)
    assert result.keybatch.refused > 0
    assert result.naive.refused > 0
    assert result.backend == "trio"
    # Clients of one account that call while its batch loads share the next batch.
    assert result.keybatch.transactions < result.keybatch.operations
    # The file holds the last run's state, in WAL mode, balances never negative.
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        balances = dict(conn.execute("SELECT id, balance FROM demo_accounts"))
        ledger = dict(
            conn.execute("SELECT account, SUM(amount) FROM demo_ledger GROUP BY 1")
        )
        rows = conn.execute("SELECT COUNT(*) FROM demo_ledger").fetchone()[0]
    conn.close()
    assert len(balances) == 3
    assert all(b >= 0 for b in balances.values())
    assert balances == {a: ledger.get(a, 0) for a in balances}
    assert rows == result.naive.succeeded
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("20 clients deposit and withdraw on 3 hot accounts")
    assert lines[1].startswith("keybatch: ")
    assert lines[-1].startswith("1 tx per op: ")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_both_runs_are_consistent_on_asyncio() -> None:
    result = await run_demo(20, 3, 0.2, out=io.StringIO(), min_duration=0.01)
    assert_sound(result)
    assert result.backend == "asyncio"
    assert "SQLite" in result.database


@pytest.mark.anyio
async def test_failed_saves_are_counted_as_failed_not_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = 0

    def flaky_save(conn: Any, d: Any, key: str, account: Account) -> None:
        nonlocal calls
        calls += 1
        if calls % 3 == 0:
            raise OSError("disk on fire")
        save_tx(conn, d, key, account)

    monkeypatch.setattr(_workload, "save_tx", flaky_save)
    result = await run_demo(20, 3, 0.2, out=io.StringIO())
    run = result.keybatch
    assert run.failed > 0
    assert run.succeeded + run.refused + run.failed == run.operations
    assert result.consistent  # the failed ones are in no balance and no ledger
    assert "SaveError: save of key 'acct-000" in run.errors[0]
    assert "(OSError: disk on fire)" in run.errors[0]
    assert "keybatch: failed operation: SaveError" in result.table()
    assert result.naive.failed == 0


def test_the_check_finds_lost_and_phantom_updates() -> None:
    sums = {"a": 30, "b": -5}
    good = check(10, sums, 3, {"a": 40, "b": 5}, {"a": 30, "b": -5}, 3)
    assert good == []
    lost = check(10, sums, 3, {"a": 10, "b": 5}, {"a": 30, "b": -5}, 3)
    assert lost == ["a: balance 10, expected 10 + 30"]
    ledger = check(10, sums, 3, {"a": 40, "b": 5}, {"a": 31, "b": -5}, 3)
    assert ledger == ["a: balance 40 disagrees with its ledger"]
    # A refused operation that left a ledger entry anyway:
    phantom = check(10, sums, 3, {"a": 40, "b": 5}, {"a": 30, "b": -5}, 4)
    assert phantom == ["ledger holds 4 entries, 3 succeeded"]
    negative = check(10, {"a": -20}, 1, {"a": -10}, {"a": -20}, 1)
    assert negative == ["a: negative balance -10"]


def test_an_overdraft_is_refused_by_the_operation() -> None:
    account = Account("a", 50, 7)
    assert account.apply(-50) == 0
    with pytest.raises(Overdraft):
        account.apply(-1)
    assert account.apply(5) == 5
    assert (account.balance, account.version, account.entries) == (5, 7, [-50, 5])


def test_progress_falls_back_to_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress(out, "kb", 10.0, start=100.0)
    assert not progress.tty
    assert progress.interval == 2.0
    progress.update(1000, 102.0)
    progress.update(3000, 104.0)
    progress.finish(5000, 110.0)
    assert out.getvalue() == (
        "kb: 1,000 operations, 500 ops/s, 8.0 s left\n"
        "kb: 3,000 operations, 1,000 ops/s, 6.0 s left\n"
        "kb: 5,000 operations in 10.0 s\n"
    )


def test_progress_updates_one_line_in_place_on_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress(out, "kb", 10.0, start=0.0, tty=True)
    assert progress.interval < 1
    progress.update(12345, 1.0)
    progress.update(12346, 11.5)  # past the end: no negative time left
    assert "\n" not in out.getvalue()
    progress.finish(12346, 11.5)
    first = "kb: 12,345 operations, 12,345 ops/s, 9.0 s left"
    second = "kb: 12,346 operations, 0 ops/s, 0.0 s left"
    last = "kb: 12,346 operations in 11.5 s"
    assert out.getvalue() == (
        f"\r{first}\r{second.ljust(len(first))}\r{last.ljust(len(second))}\n"
    )


def test_arguments() -> None:
    args = parse_args([])
    assert (args.clients, args.keys, args.seconds) == (1000, 20, 10.0)
    assert (args.min_duration, args.backend, args.db) == (0.0, "trio", None)
    args = parse_args(
        [
            "--clients",
            "5",
            "--keys",
            "2",
            "--seconds",
            "0.5",
            "--min-duration",
            "0.01",
            "--backend",
            "asyncio",
            "--db",
            "x.db",
        ]
    )
    assert (args.clients, args.keys, args.seconds) == (5, 2, 0.5)
    assert (args.min_duration, args.backend, args.db) == (0.01, "asyncio", "x.db")


@pytest.mark.parametrize(
    "argv",
    [
        ["--clients", "0"],
        ["--keys", "-1"],
        ["--seconds", "-1"],
        ["--min-duration", "inf"],
        ["--backend", "curio"],
        ["--clients", "many"],
    ],
)
def test_bad_arguments_are_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_main_runs_the_demo_and_prints_the_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [
        "--clients",
        "10",
        "--keys",
        "2",
        "--seconds",
        "0.1",
        "--backend",
        "asyncio",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "\r" not in out  # captured output is not a terminal
    assert "keybatch: " in out
    assert "operations per second" in out
    assert "10 clients, 2 hot accounts, 0.1 s per run" in out
    assert "asyncio" in out


def test_a_postgres_url_without_psycopg_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg fails
    assert main(["--db", "postgresql://localhost/none", "--seconds", "0"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'psycopg[binary]'" in err


def test_a_sqlite_file_that_cannot_be_opened_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "no such directory" / "demo.db"
    assert main(["--db", str(db), "--seconds", "0"]) == 2
    assert "cannot open the SQLite database" in capsys.readouterr().err


@pytest.mark.anyio
async def test_cancelling_the_demo_stops_it_and_removes_its_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = tmp_path / "made"
    made.mkdir()
    monkeypatch.setattr(tempfile, "mkdtemp", lambda: str(made))
    with trio.move_on_after(0.3) as scope:
        await run_demo(20, 2, 30.0, out=io.StringIO())
    assert scope.cancelled_caught
    assert not made.exists()


def _postgres_url() -> str:
    """DATABASE_URL, or the local test server; skip only outside CI."""
    url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    try:
        psycopg = importlib.import_module("psycopg")
        psycopg.connect(url, connect_timeout=5).close()
    except Exception as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no PostgreSQL at {url}: {exc!r}")
    return url


@pytest.mark.anyio
async def test_postgres() -> None:
    url = _postgres_url()
    result = await run_demo(20, 3, 0.3, db=url, out=io.StringIO())
    assert_sound(result)
    assert "PostgreSQL" in result.database
