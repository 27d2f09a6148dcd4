"""The bank service: Starlette, keybatch opened in the lifespan, PostgreSQL.

Run it on asyncio (uvicorn, asyncpg) or trio (hypercorn, psycopg in threads):

    uvicorn bank.app:app
    hypercorn --worker-class trio bank.app:app

Settings come from the environment (see `Settings.from_env`).
"""

from __future__ import annotations

import json
import os
from collections import Counter, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import sniffio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import keybatch

from .model import (
    ACCOUNT_ID,
    IDEMPOTENCY_KEY,
    MAX_AMOUNT,
    Account,
    Refused,
    Reply,
    apply,
    read_balance,
    request_hash,
)
from .stores import AsyncpgStore, PsycopgStore, Store

__all__ = ["Settings", "app", "create_app"]

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


@dataclass(frozen=True)
class Settings:
    dsn: str = DEFAULT_DSN
    schema: str = "bank"
    # "asyncpg" (asyncio only), "psycopg" (threads: trio or asyncio), or
    # "auto": asyncpg on asyncio, psycopg on trio.
    store: str = "auto"
    # "keybatch", or "direct": one transaction per request (the baseline).
    mode: str = "keybatch"
    # The pool has one connection per worker: at most `workers` loads and saves
    # are in flight, so a batch never waits for a connection.
    workers: int = 16
    # A window of 10 ms adds little latency; under load the batches grow anyway
    # (a busy store makes each load longer, and what arrives meanwhile joins).
    min_duration: float = 0.01
    # The deadline guards against a hung store; it must stay far above what
    # batches take at peak: at 1,000 connections on a loaded 2-core machine
    # they took up to 4.4 s (docs/sizing.md). 2.0 failed 29% of the requests.
    max_duration: float = 5.0
    # Bounds memory: past this many unfinished operations, requests get 429.
    max_pending: int = 5000
    max_body: int = 1024  # bytes
    extra: dict[str, Any] = field(default_factory=dict)  # open_processor(**extra)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        s = cls()
        return replace(
            s,
            dsn=env.get("DATABASE_URL", s.dsn),
            schema=env.get("BANK_SCHEMA", s.schema),
            store=env.get("BANK_STORE", s.store),
            mode=env.get("BANK_MODE", s.mode),
            workers=int(env.get("BANK_WORKERS", s.workers)),
            min_duration=float(env.get("BANK_MIN_DURATION", s.min_duration)),
            max_duration=float(env.get("BANK_MAX_DURATION", s.max_duration)),
            max_pending=int(env.get("BANK_MAX_PENDING", s.max_pending)),
            max_body=int(env.get("BANK_MAX_BODY", s.max_body)),
        )


class Bank:
    """What the lifespan opens: the store and the processor."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        processor: keybatch.Processor[Account] | None,
        batches: BatchTimes | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.processor = processor
        self.batches = batches
        self.responses: Counter[str] = Counter()  # of deposits and withdrawals
        self.causes: Counter[str] = Counter()  # "status:cause" of the 5xx


class BatchTimes:
    """on_batch hook: the recent batches' times, for /stats and docs/sizing.md."""

    def __init__(self, keep: int = 20_000) -> None:
        self.io: deque[float] = deque(maxlen=keep)  # load + save
        self.total: deque[float] = deque(maxlen=keep)  # start to delivery
        self.replays = 0

    def __call__(self, report: keybatch.BatchReport) -> None:
        self.io.append(report.load_duration + (report.save_duration or 0.0))
        self.total.append(report.duration)
        self.replays += report.replays

    def summary(self) -> dict[str, Any]:
        def ms(values: deque[float], q: float) -> float:
            ordered = sorted(values)
            if not ordered:
                return 0.0
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 1)

        return {
            "batches": len(self.io),
            "load_plus_save_ms": {"p50": ms(self.io, 0.5), "p99": ms(self.io, 0.99)},
            "duration_ms": {
                "p50": ms(self.total, 0.5),
                "p99": ms(self.total, 0.99),
                "max": ms(self.total, 1.0),
            },
            "replays": self.replays,
        }


def _make_store(settings: Settings) -> Store:
    kind = settings.store
    if kind == "auto":
        kind = "asyncpg" if sniffio.current_async_library() == "asyncio" else "psycopg"
    if kind == "asyncpg":
        return AsyncpgStore(settings.dsn, settings.schema, size=settings.workers)
    if kind == "psycopg":
        return PsycopgStore(settings.dsn, settings.schema, size=settings.workers)
    raise ValueError(f"unknown store {kind!r}")


# --- errors ------------------------------------------------------------------


def _error(status: int, code: str, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status, headers=headers)


def _map_error(exc: Exception) -> Response:
    """Which exception becomes which HTTP status (docs/web-service.md)."""
    if isinstance(exc, Refused):  # the operation said no: nothing changed
        return _error(exc.status, exc.code, str(exc))
    if isinstance(exc, keybatch.Overloaded):  # max_pending reached: not enqueued
        return _error(429, "overloaded", "too many requests in flight", **_RETRY)
    if isinstance(exc, keybatch.LoadError):  # nothing was applied
        return _error(503, "unavailable", "the account could not be read", **_RETRY)
    if isinstance(exc, keybatch.ProcessorStopped):  # shutting down: not applied
        return _error(503, "stopping", "the service is stopping", **_RETRY)
    if isinstance(exc, keybatch.SaveError):
        if not getattr(exc, "may_have_landed", True):
            # Refused before writing (conflicts past max_replays): not applied.
            return _error(503, "not_saved", "nothing was written; retry", **_RETRY)
        # Interrupted after it began: it may or may not have been applied.
        return _error(
            500,
            "outcome_unknown",
            "the write may or may not have landed; retry with the same Idempotency-Key",
        )
    raise exc


_RETRY = {"Retry-After": "1"}


# --- input -------------------------------------------------------------------


class BadRequest(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest(400, "bad_length", "Content-Length is not a number")
        if int(declared) > limit:
            raise BadRequest(413, "too_large", f"the body may hold {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:  # chunked, or a lying Content-Length
            raise BadRequest(413, "too_large", f"the body may hold {limit} bytes")
    return bytes(body)


def _parse_amount(body: bytes) -> int:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest(400, "bad_json", "the body is not JSON") from None
    if not isinstance(data, dict) or set(data) != {"amount"}:
        raise BadRequest(400, "bad_body", 'the body must be {"amount": <integer>}')
    amount = data["amount"]
    if type(amount) is not int:  # not a bool, float or string
        raise BadRequest(400, "bad_amount", "the amount must be an integer")
    if not 1 <= amount <= MAX_AMOUNT:
        raise BadRequest(
            400, "bad_amount", f"the amount must be between 1 and {MAX_AMOUNT}"
        )
    return amount


def _account_id(request: Request) -> str:
    account = request.path_params["account"]
    if not ACCOUNT_ID.fullmatch(account):
        raise BadRequest(
            400, "bad_account", "account ids are 1-64 characters: A-Z a-z 0-9 _ -"
        )
    return str(account)


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        raise BadRequest(
            400, "bad_idempotency_key", "keys are 1-100 characters: A-Z a-z 0-9 _ . : -"
        )
    return key


# --- endpoints ---------------------------------------------------------------


_PID = str(os.getpid())


def _reply(reply: Reply) -> JSONResponse:
    # X-Bank-Pid: which process answered (the routing test reads it).
    headers = {"X-Bank-Pid": _PID}
    if reply.replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(reply.body, headers=headers)


async def _deposit(request: Request) -> Response:
    return await _change(request, "deposit")


async def _withdraw(request: Request) -> Response:
    return await _change(request, "withdraw")


async def _change(request: Request, kind: str) -> Response:
    bank: Bank = request.app.state.bank
    response = await _apply_change(request, kind, bank)
    bank.responses[str(response.status_code)] += 1
    return response


async def _apply_change(request: Request, kind: str, bank: Bank) -> Response:
    try:
        account = _account_id(request)
        key = _idempotency_key(request)
        body = await _read_body(request, bank.settings.max_body)
        amount = _parse_amount(body)
    except BadRequest as exc:
        return _error(exc.status, exc.code, str(exc))
    rhash = request_hash(request.method, request.url.path, body)
    try:
        if bank.processor is None:
            try:
                reply = await bank.store.direct(account, kind, amount, key, rhash)
            except Refused:
                raise
            except Exception as exc:  # the transaction's outcome is unknown
                bank.causes[f"500:{type(exc).__name__}"] += 1
                return _error(500, "outcome_unknown", "retry with the same key")
            return _reply(reply)
        with bank.store.watch(account, key):
            # submit, not run: past max_pending it raises Overloaded at once
            # (429) instead of queueing the request.
            pending = bank.processor.submit(account, apply, kind, amount, key, rhash)
            return _reply(await pending.result())
    except (Refused, keybatch.KeybatchError) as exc:
        response = _map_error(exc)
        if response.status_code >= 500:
            cause = exc.__cause__
            name = type(cause).__name__ if cause is not None else type(exc).__name__
            bank.causes[f"{response.status_code}:{name}"] += 1
        return response


async def _balance(request: Request) -> Response:
    bank: Bank = request.app.state.bank
    try:
        account = _account_id(request)
    except BadRequest as exc:
        return _error(exc.status, exc.code, str(exc))
    if bank.processor is None:
        return JSONResponse(
            {"account": account, "balance": await bank.store.balance(account)}
        )
    try:
        return _reply(await bank.processor.submit(account, read_balance).result())
    except keybatch.KeybatchError as exc:
        return _map_error(exc)


async def _stats(request: Request) -> Response:
    bank: Bank = request.app.state.bank
    data: dict[str, Any] = {
        "pid": os.getpid(),
        "store": bank.store.statistics(),
        "responses": dict(bank.responses),
        "causes": dict(bank.causes),
    }
    if bank.processor is not None:
        data["processor"] = asdict(bank.processor.statistics())
    if bank.batches is not None:
        data["batches"] = bank.batches.summary()
    return JSONResponse(data)


async def _health(request: Request) -> Response:
    return JSONResponse({"ok": True, "pid": os.getpid()})


# --- the app -----------------------------------------------------------------


def create_app(settings: Settings | None = None) -> Starlette:
    """The ASGI app. `settings=None` reads them from the environment at startup."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Startup: the pool, then the processor. Shutdown runs in reverse, and
        # only after the server finished the requests in flight: the processor
        # drains (every accepted operation is saved or fails), then the pool
        # closes.
        s = Settings.from_env() if settings is None else settings
        store = _make_store(s)
        await store.open()
        try:
            if s.mode == "direct":
                app.state.bank = Bank(s, store, None)
                yield
                return
            extra = dict(s.extra)
            batches = BatchTimes()
            hook = extra.pop("on_batch", None)

            def on_batch(report: keybatch.BatchReport) -> None:
                batches(report)
                if hook is not None:
                    hook(report)

            async with keybatch.open_processor(
                load=store.load,
                save=store.save,
                workers=s.workers,
                min_duration=s.min_duration,
                max_duration=s.max_duration,
                max_pending=s.max_pending,
                on_batch=on_batch,
                **extra,
            ) as processor:
                app.state.bank = Bank(s, store, processor, batches)
                yield
        finally:
            await store.aclose()

    return Starlette(
        routes=[
            Route("/accounts/{account:str}/deposit", _deposit, methods=["POST"]),
            Route("/accounts/{account:str}/withdraw", _withdraw, methods=["POST"]),
            Route("/accounts/{account:str}", _balance, methods=["GET"]),
            Route("/stats", _stats, methods=["GET"]),
            Route("/health", _health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


app = create_app()
