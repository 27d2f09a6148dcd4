"""Type-checked with ``mypy --strict tests/typing``; never run.

Each ``assert_type`` pins what a user's type checker infers from the public API.
"""

from __future__ import annotations

from typing_extensions import assert_type

import keybatch


class Account:
    balance = 0

    def deposit(self, amount: int) -> int:
        self.balance += amount
        return self.balance


async def load(key: str) -> Account:
    return Account()


async def save(key: str, account: Account) -> None:
    pass


def on_batch(report: keybatch.BatchReport) -> None:
    assert_type(report.operations, int)
    assert_type(report.error, keybatch.BatchError | None)


async def main() -> None:
    async with keybatch.open_processor(
        load=load, save=save, min_duration=0.05, on_batch=on_batch
    ) as processor:
        assert_type(processor, keybatch.Processor[Account])
        balance = await processor.run("account:42", Account.deposit, 10)
        assert_type(balance, int)
        named = await processor.run("account:42", Account.deposit, amount=10)
        assert_type(named, int)
        pending = processor.submit("account:42", lambda acc: acc.balance > 0)
        assert_type(pending, keybatch.Pending[bool])
        assert_type(await pending.result(), bool)
        assert_type(pending.done(), bool)
        assert_type(processor.statistics(), keybatch.ProcessorStatistics)
        await processor.flush()
        await processor.aclose()
        # wrong argument types are caught by the checker
        await processor.run("k", Account.deposit, "ten")  # type: ignore[arg-type]
        await processor.run("k", Account.deposit)  # type: ignore[call-arg]

    async with keybatch.open_processor() as plain:
        assert_type(plain, keybatch.Processor[None])
        assert_type(await plain.run(b"k", lambda r: r), None)

    assert_type(keybatch.worker_for_key("k", 16), int)
