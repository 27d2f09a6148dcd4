"""The HTTP API in-process: operations, bad input, idempotency, error mapping."""

from __future__ import annotations

import gc
import json
import tracemalloc
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from bank import app as bank_app
from bank.model import MAX_AMOUNT, MAX_BALANCE
from bank.stores import AsyncpgStore, PsycopgStore

import keybatch

from .conftest import OpenBank, sql

pytestmark = pytest.mark.anyio


async def post(
    client: Any,
    account: str,
    kind: str,
    amount: Any,
    key: str | None = None,
    **kwargs: Any,
) -> Any:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return await client.post(
        f"/accounts/{account}/{kind}",
        content=json.dumps({"amount": amount}),
        headers=headers,
        **kwargs,
    )


def snapshot(dsn: str, schema: str) -> tuple[Any, Any]:
    return (
        sql(dsn, f'SELECT * FROM "{schema}".accounts ORDER BY id'),
        sql(dsn, f'SELECT account, key, delta FROM "{schema}".requests ORDER BY 1, 2'),
    )


async def test_deposit_withdraw_balance(open_bank: OpenBank) -> None:
    async with open_bank() as (client, _):
        r = await post(client, "alice", "deposit", 100)
        assert r.status_code == 200
        assert r.json() == {
            "account": "alice",
            "operation": "deposit",
            "amount": 100,
            "balance": 100,
        }
        assert (await post(client, "alice", "withdraw", 30)).json()["balance"] == 70
        r = await client.get("/accounts/alice")
        assert r.json() == {"account": "alice", "balance": 70}
        assert (await client.get("/accounts/nobody")).json()["balance"] == 0


async def test_many_concurrent_requests_share_batches(open_bank: OpenBank) -> None:
    reports: list[keybatch.BatchReport] = []
    async with open_bank(extra={"on_batch": reports.append}) as (client, bank):
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(post, client, f"acct{i % 4}", "deposit", 1)
        balances = [
            (await client.get(f"/accounts/acct{i}")).json()["balance"] for i in range(4)
        ]
    assert balances == [50, 50, 50, 50]
    assert bank.store.saves < 200  # batched: far fewer saves than requests
    assert sum(r.operations for r in reports) == 204


async def test_overdraft_is_refused_and_changes_nothing(
    open_bank: OpenBank, dsn: str, schema: str
) -> None:
    async with open_bank() as (client, _):
        await post(client, "bob", "deposit", 10)
        before = snapshot(dsn, schema)
        r = await post(client, "bob", "withdraw", 11, key="k-over")
        assert r.status_code == 409
        assert r.json()["error"] == "insufficient_funds"
        r = await post(client, "carol", "withdraw", 1)  # no such account: balance 0
        assert r.status_code == 409
        assert snapshot(dsn, schema) == before


async def test_deposit_past_the_balance_limit_is_refused(open_bank: OpenBank) -> None:
    async with open_bank() as (client, _):
        # Reaching the limit takes 1,000 of the largest deposits.
        async with anyio.create_task_group() as tg:
            for _ in range(MAX_BALANCE // MAX_AMOUNT):
                tg.start_soon(post, client, "rich", "deposit", MAX_AMOUNT)
        r = await post(client, "rich", "deposit", 1)
        assert r.status_code == 409
        assert r.json()["error"] == "balance_limit"
        assert (await client.get("/accounts/rich")).json()["balance"] == MAX_BALANCE


BAD_BODIES = [
    pytest.param(b'{"amount": "10"}', 400, id="string"),
    pytest.param(b'{"amount": 1.5}', 400, id="float"),
    pytest.param(b'{"amount": 1e3}', 400, id="exponent"),
    pytest.param(b'{"amount": true}', 400, id="bool"),
    pytest.param(b'{"amount": null}', 400, id="null"),
    pytest.param(b'{"amount": 0}', 400, id="zero"),
    pytest.param(b'{"amount": -5}', 400, id="negative"),
    pytest.param(b'{"amount": %d}' % (MAX_AMOUNT + 1), 400, id="too-large"),
    pytest.param(b'{"amount": ' + b"9" * 500 + b"}", 400, id="huge"),
    pytest.param(b'{"amount": NaN}', 400, id="nan"),
    pytest.param(b'{"amount": Infinity}', 400, id="infinity"),
    pytest.param(b'{"amount": 5, "to": "x"}', 400, id="extra-field"),
    pytest.param(b"{}", 400, id="no-amount"),
    pytest.param(b"[5]", 400, id="list"),
    pytest.param(b"", 400, id="empty"),
    pytest.param(b"amount=5", 400, id="form"),
    pytest.param(b"\xff\xfe", 400, id="not-utf8"),
    pytest.param(b"[" * 510 + b"]" * 510, 400, id="deep-nesting"),
    pytest.param(b'{"amount": 5}' + b" " * 2000, 413, id="oversized"),
]


@pytest.mark.parametrize(("body", "status"), BAD_BODIES)
async def test_bad_bodies_get_4xx_and_change_nothing(
    open_bank: OpenBank, dsn: str, schema: str, body: bytes, status: int
) -> None:
    async with open_bank() as (client, _):
        await post(client, "dave", "deposit", 50)
        before = snapshot(dsn, schema)
        for kind in ("deposit", "withdraw"):
            r = await client.post(
                f"/accounts/dave/{kind}", content=body, headers={"Idempotency-Key": "k"}
            )
            assert r.status_code == status, r.text
            assert "error" in r.json()
        assert snapshot(dsn, schema) == before


async def test_a_chunked_body_past_the_limit_is_refused(
    open_bank: OpenBank, dsn: str, schema: str
) -> None:
    async def chunks() -> Any:
        yield b'{"amount": 5'
        for _ in range(100):
            yield b" " * 100
        yield b"}"

    async with open_bank() as (client, _):
        r = await client.post("/accounts/erin/deposit", content=chunks())
        assert r.status_code == 413
        assert snapshot(dsn, schema) == ([], [])


@pytest.mark.parametrize(
    "account",
    [
        pytest.param("a" * 65, id="too-long"),
        pytest.param("al%20ice", id="space"),
        pytest.param("al%27ice", id="quote"),
        pytest.param("x%3BDROP%20TABLE%20accounts", id="sql"),
        pytest.param("%C3%A9t%C3%A9", id="non-ascii"),
        pytest.param("a%00b", id="nul"),
        pytest.param("a.b", id="dot"),
    ],
)
async def test_odd_account_ids_get_400_and_change_nothing(
    open_bank: OpenBank, dsn: str, schema: str, account: str
) -> None:
    async with open_bank() as (client, _):
        for r in (
            await client.post(f"/accounts/{account}/deposit", content=b'{"amount": 5}'),
            await client.get(f"/accounts/{account}"),
        ):
            assert r.status_code == 400
            assert r.json()["error"] == "bad_account"
        assert snapshot(dsn, schema) == ([], [])


@pytest.mark.parametrize("key", ["", "k" * 101, "a b", "ké", "a/b", "a'b"])
async def test_odd_idempotency_keys_get_400(
    open_bank: OpenBank, dsn: str, schema: str, key: str
) -> None:
    async with open_bank() as (client, _):
        r = await client.post(
            "/accounts/fay/deposit",
            content=b'{"amount": 5}',
            headers=[(b"Idempotency-Key", key.encode())],
        )
        assert r.status_code == 400
        assert r.json()["error"] == "bad_idempotency_key"
        assert snapshot(dsn, schema) == ([], [])


async def test_a_retry_with_the_same_key_is_applied_once(open_bank: OpenBank) -> None:
    async with open_bank() as (client, _):
        first = await post(client, "gus", "deposit", 40, key="dep-1")
        again = await post(client, "gus", "deposit", 40, key="dep-1")
        assert again.status_code == 200
        assert again.json() == first.json()
        assert again.headers["Idempotent-Replayed"] == "true"
        assert "Idempotent-Replayed" not in first.headers
        # The key belongs to the account in the URL; the balance moved once.
        assert (await client.get("/accounts/gus")).json()["balance"] == 40


async def test_concurrent_duplicates_are_applied_once(open_bank: OpenBank) -> None:
    replies: list[Any] = []

    async def send() -> None:
        replies.append(await post(client, "hal", "deposit", 7, key="same"))

    async with open_bank() as (client, _):
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(send)
        assert {r.status_code for r in replies} == {200}
        assert {r.json()["balance"] for r in replies} == {7}
        assert (await client.get("/accounts/hal")).json()["balance"] == 7


async def test_a_key_reused_for_another_request_gets_409(
    open_bank: OpenBank, dsn: str, schema: str
) -> None:
    async with open_bank() as (client, _):
        await post(client, "ivy", "deposit", 10, key="once")
        before = snapshot(dsn, schema)
        for kind, amount in (("deposit", 11), ("withdraw", 10)):
            r = await post(client, "ivy", kind, amount, key="once")
            assert r.status_code == 409
            assert r.json()["error"] == "idempotency_key_reused"
        assert snapshot(dsn, schema) == before


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    yield
    tracemalloc.stop()


@pytest.mark.usefixtures("traced")
async def test_a_flood_of_distinct_accounts_is_bounded_by_max_pending(
    open_bank: OpenBank, dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    peak = 0
    real_load = AsyncpgStore.load

    async def slow_load(self: AsyncpgStore, account_id: str) -> Any:
        nonlocal peak
        peak = max(peak, bank.processor.statistics().pending_operations)
        await anyio.sleep(0.05)
        return await real_load(self, account_id)

    monkeypatch.setattr(AsyncpgStore, "load", slow_load)
    statuses: list[int] = []
    retry_after: set[str] = set()

    async def send(i: int) -> None:
        r = await post(client, f"flood-{i}", "withdraw", 1, key=f"k{i}")
        statuses.append(r.status_code)
        if r.status_code == 429:
            retry_after.add(r.headers["Retry-After"])

    async with open_bank(max_pending=16, workers=2) as (client, bank):
        held = []
        for flood in range(3):  # the later floods find nothing left over
            async with anyio.create_task_group() as tg:
                for i in range(300):
                    tg.start_soon(send, flood * 1000 + i)
            stats = bank.processor.statistics()
            assert (stats.keys, stats.pending_operations) == (0, 0)
            assert bank.store._inflight == {}  # the idempotency watch list
            gc.collect()
            held.append(tracemalloc.get_traced_memory()[0])
    # Memory stays flat: 300 more distinct accounts per flood leave nothing.
    assert held[2] - held[1] < 100_000, held
    assert set(statuses) == {409, 429}  # refused (no funds) or turned away
    assert statuses.count(429) > 450
    assert retry_after == {"1"}
    assert peak <= 16
    assert snapshot(dsn, schema) == ([], [])


async def test_an_unknown_outcome_is_retried_safely_with_its_key(
    open_bank: OpenBank, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The save commits, then the connection drops: the caller cannot know."""
    real_save = AsyncpgStore.save
    drop = True

    async def save_then_drop(self: AsyncpgStore, key: str, account: Any) -> None:
        nonlocal drop
        await real_save(self, key, account)
        if drop:
            drop = False
            raise ConnectionResetError("the connection dropped after COMMIT")

    monkeypatch.setattr(AsyncpgStore, "save", save_then_drop)
    async with open_bank() as (client, _):
        r = await post(client, "jo", "deposit", 25, key="pay-1")
        assert r.status_code == 500
        assert r.json()["error"] == "outcome_unknown"
        r = await post(client, "jo", "deposit", 25, key="pay-1")
        assert r.status_code == 200
        assert r.headers["Idempotent-Replayed"] == "true"
        assert (await client.get("/accounts/jo")).json()["balance"] == 25


async def test_a_save_cut_by_the_deadline_is_an_unknown_outcome(
    open_bank: OpenBank, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncpg's save is cancelled mid-flight by the batch deadline."""
    real_save = AsyncpgStore.save
    slow = True

    async def save_slowly(self: AsyncpgStore, key: str, account: Any) -> None:
        nonlocal slow
        await real_save(self, key, account)  # committed ...
        if slow:
            slow = False
            await anyio.sleep(5)  # ... then stuck until the deadline cancels it

    monkeypatch.setattr(AsyncpgStore, "save", save_slowly)
    async with open_bank(min_duration=0.0, max_duration=0.3) as (client, _):
        r = await post(client, "kim", "deposit", 5, key="k1")
        assert r.status_code == 500
        r = await post(client, "kim", "deposit", 5, key="k1")
        assert r.status_code == 200
        assert (await client.get("/accounts/kim")).json()["balance"] == 5


async def test_conflicts_past_max_replays_answer_503(
    open_bank: OpenBank, dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def always_conflict(self: AsyncpgStore, key: str, account: Any) -> None:
        raise keybatch.Conflict("someone else always saves first")

    monkeypatch.setattr(AsyncpgStore, "save", always_conflict)
    async with open_bank() as (client, _):
        r = await post(client, "lee", "deposit", 5)
        assert r.status_code == 503
        assert r.json()["error"] == "not_saved"
        assert r.headers["Retry-After"] == "1"
    assert snapshot(dsn, schema) == ([], [])


def test_error_mapping() -> None:
    def status(exc: Exception) -> tuple[int, str | None]:
        response = bank_app._map_error(exc)
        return response.status_code, response.headers.get("retry-after")

    assert status(keybatch.Overloaded()) == (429, "1")
    assert status(keybatch.LoadError("k", "x")) == (503, "1")
    assert status(keybatch.ProcessorStopped()) == (503, "1")
    assert status(keybatch.SaveError("k", "x", may_have_landed=False)) == (503, "1")
    assert status(keybatch.SaveError("k", "x", may_have_landed=True)) == (500, None)
    with pytest.raises(RuntimeError):
        bank_app._map_error(RuntimeError("a bug is not an HTTP status"))


async def test_a_load_failure_answers_503(
    open_bank: OpenBank, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: AsyncpgStore, key: str) -> Any:
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr(AsyncpgStore, "load", broken)
    async with open_bank() as (client, _):
        r = await post(client, "max", "deposit", 5)
        assert r.status_code == 503
        assert r.json()["error"] == "unavailable"


async def test_direct_mode_the_baseline_agrees(open_bank: OpenBank) -> None:
    async with open_bank(mode="direct") as (client, _):
        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(post, client, "ned", "deposit", 1, f"d{i % 20}")
        assert (await post(client, "ned", "withdraw", 21)).status_code == 409
        r = await post(client, "ned", "deposit", 1, key="d3")
        assert r.headers["Idempotent-Replayed"] == "true"
        assert (await client.get("/accounts/ned")).json()["balance"] == 20


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_the_same_app_on_trio_with_psycopg(open_bank: OpenBank) -> None:
    async with open_bank() as (client, bank):
        assert isinstance(bank.store, PsycopgStore)
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(post, client, "ola", "deposit", 2, f"t{i % 25}")
        assert (await client.get("/accounts/ola")).json()["balance"] == 50
        r = await post(client, "ola", "withdraw", 51)
        assert r.status_code == 409
        r = await post(client, "ola", "deposit", 2, key="t7")
        assert r.headers["Idempotent-Replayed"] == "true"
        assert (await post(client, "ola", "deposit", 3, key="t7")).status_code == 409
