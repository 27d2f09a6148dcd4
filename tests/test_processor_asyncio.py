"""A representative subset of the processor's behaviour on asyncio."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import keybatch

from .test_processor import Account, outcome_of

pytestmark = pytest.mark.anyio


async def _asyncio_store() -> tuple[dict[str, int], Any, Any]:
    data: dict[str, int] = {}

    async def load(key: str) -> Account:
        return Account(data.get(key, 0))

    async def save(key: str, account: Account) -> None:
        data[key] = account.balance

    return data, load, save


async def test_asyncio_batches_and_serializes() -> None:
    data, load, save = await _asyncio_store()
    results: list[int] = []
    reports: list[keybatch.BatchReport] = []
    async with keybatch.open_processor(
        load=load, save=save, min_duration=0, on_batch=reports.append
    ) as processor:

        async def call() -> None:
            results.append(await processor.run("k", Account.deposit, 1))

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(call)
    assert data == {"k": 200}
    assert sorted(results) == list(range(1, 201))
    assert len(reports) < 200, "operations were batched"


async def test_asyncio_load_error_per_caller() -> None:
    cause = OSError("down")

    async def load(key: str) -> None:
        raise cause

    errors: list[BaseException] = []
    async with keybatch.open_processor(load=load, min_duration=0) as processor:

        async def call() -> None:
            errors.append(await outcome_of(lambda: processor.run("k", id)))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(call)
    assert [type(e) for e in errors] == [keybatch.LoadError] * 3
    assert len({id(e) for e in errors}) == 3
    assert all(e.__cause__ is cause for e in errors)


async def test_asyncio_cancelled_caller_is_withdrawn() -> None:
    data, load, save = await _asyncio_store()
    async with keybatch.open_processor(
        load=load, save=save, min_duration=0.05
    ) as processor:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await processor.run("k", Account.deposit, 1)
        assert await processor.run("k", Account.deposit, 2) == 2
    assert data == {"k": 2}
    assert processor.statistics().operations_withdrawn == 1


async def test_asyncio_save_timeout_and_stop() -> None:
    async def save(key: str, resource: None) -> None:
        await anyio.sleep(10)

    async with keybatch.open_processor(
        save=save, min_duration=0.001, max_duration=0.02
    ) as processor:
        with pytest.raises(keybatch.SaveError) as info:
            await processor.run("k", lambda r: None)
        assert isinstance(info.value.__cause__, TimeoutError)
    with pytest.raises(keybatch.ProcessorStopped):
        await processor.run("k", lambda r: None)
    assert processor.statistics().keys == 0


async def test_asyncio_body_error_is_not_wrapped() -> None:
    with pytest.raises(KeyError):
        async with keybatch.open_processor():
            raise KeyError("mine")
