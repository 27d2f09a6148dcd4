"""The bank's resource and operations: plain, synchronous, pure functions.

keybatch applies the operations of one account in call order to the account as
loaded, then saves it once. After a version conflict it loads again and applies
them again, so an operation must depend only on the account and its arguments:
it must not read the clock, draw random numbers or touch anything outside.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ACCOUNT_ID",
    "IDEMPOTENCY_KEY",
    "MAX_AMOUNT",
    "MAX_BALANCE",
    "Account",
    "BalanceLimit",
    "InsufficientFunds",
    "KeyReused",
    "Record",
    "Refused",
    "Reply",
    "apply",
    "read_balance",
    "request_hash",
]

# What the service accepts. Anything else is refused with a 4xx before it
# reaches keybatch or the database.
ACCOUNT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
MAX_AMOUNT = 10**12  # one operation moves at most this much
MAX_BALANCE = 10**15  # far below PostgreSQL's bigint limit (9.2e18)


class Refused(Exception):
    """The operation was refused by the bank's rules; nothing changed."""

    status = 409
    code = "refused"


class InsufficientFunds(Refused):
    code = "insufficient_funds"


class BalanceLimit(Refused):
    code = "balance_limit"


class KeyReused(Refused):
    """The idempotency key was used before for a different request."""

    code = "idempotency_key_reused"


@dataclass(frozen=True)
class Record:
    """An applied request: stored with the balance, in the same transaction."""

    request_hash: str
    delta: int
    response: str  # the JSON body that was (or will be) sent


@dataclass(frozen=True)
class Reply:
    body: dict[str, Any]
    replayed: bool = False  # a retry: the stored response of the first attempt


@dataclass
class Account:
    """One account as loaded: the row, plus the applied requests it needs to know."""

    id: str
    balance: int = 0
    version: int = 0  # 0: no row yet
    # Requests applied in earlier batches whose keys are in flight now (loaded).
    known: dict[str, Record] = field(default_factory=dict)
    # Requests applied in this batch: the save inserts them.
    new: dict[str, Record] = field(default_factory=dict)
    dirty: bool = False  # a batch of reads only saves nothing


def request_hash(method: str, path: str, body: bytes) -> str:
    """What a retry must repeat exactly to count as the same request."""
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode(), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def apply(
    account: Account, kind: str, amount: int, key: str | None, rhash: str
) -> Reply:
    """Deposit or withdraw `amount`; a request seen before returns its first reply.

    Checks come first and change nothing; the change comes last, so a refused
    operation leaves the account as it was.
    """
    if key is not None:
        seen = account.new.get(key) or account.known.get(key)
        if seen is not None:
            if seen.request_hash != rhash:
                raise KeyReused(f"idempotency key {key!r} was used for another request")
            return Reply(json.loads(seen.response), replayed=True)
    if kind == "deposit":
        delta = amount
        if account.balance + amount > MAX_BALANCE:
            raise BalanceLimit(f"the balance may not exceed {MAX_BALANCE}")
    elif kind == "withdraw":
        delta = -amount
        if amount > account.balance:
            raise InsufficientFunds(f"balance {account.balance} < {amount}")
    else:  # pragma: no cover - the routes allow only the two
        raise ValueError(f"unknown operation {kind!r}")
    account.balance += delta
    account.dirty = True
    body = {
        "account": account.id,
        "operation": kind,
        "amount": amount,
        "balance": account.balance,
    }
    if key is not None:
        account.new[key] = Record(rhash, delta, json.dumps(body))
    return Reply(body)


def read_balance(account: Account) -> Reply:
    """A read through the processor sees every write accepted before it."""
    return Reply({"account": account.id, "balance": account.balance})
