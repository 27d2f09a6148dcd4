"""A representative subset of the processor's behaviour on asyncio."""

from __future__ import annotations

import sys
from typing import Any

import anyio
import pytest

import keybatch

from .conftest import asyncio_autojump_backend
from .test_processor import Account, outcome_of

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """asyncio in virtual time: no test here waits on the wall clock."""
    return asyncio_autojump_backend()


def now() -> float:
    return anyio.current_time()


async def settle() -> None:
    """Let every runnable task run until it blocks (asyncio has no
    wait_all_tasks_blocked; this loops enough times for these tests)."""
    for _ in range(20):
        await anyio.lowlevel.checkpoint()


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
        load=load, save=save, min_duration=0.5
    ) as processor:
        start = now()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await processor.run("k", Account.deposit, 1)
        assert await processor.run("k", Account.deposit, 2) == 2
        assert now() - start == pytest.approx(0.5)
    assert data == {"k": 2}
    assert processor.statistics().operations_withdrawn == 1


async def test_asyncio_save_timeout_and_stop() -> None:
    async def save(key: str, resource: None) -> None:
        await anyio.sleep(10)

    async with keybatch.open_processor(
        save=save, min_duration=0.1, max_duration=0.3
    ) as processor:
        start = now()
        with pytest.raises(keybatch.SaveError) as info:
            await processor.run("k", lambda r: None)
        assert isinstance(info.value.__cause__, TimeoutError)
        assert now() - start == pytest.approx(0.3)
    with pytest.raises(keybatch.ProcessorStopped):
        await processor.run("k", lambda r: None)
    assert processor.statistics().keys == 0


async def test_asyncio_body_error_is_not_wrapped() -> None:
    with pytest.raises(KeyError):
        async with keybatch.open_processor():
            raise KeyError("mine")


# ---------------------------------------------------------------------------
# One of many callers cancelled: the others park on one shared future on
# asyncio, so each way of cancelling a single task is checked here.
# ---------------------------------------------------------------------------


async def _many_callers_one_cancelled(cancel: Any) -> tuple[list[Any], Any]:
    """Ten callers on one key; ``cancel(task)`` cancels the fifth while queued."""
    import asyncio

    data, load, save = await _asyncio_store()
    results: list[Any] = []
    async with keybatch.open_processor(
        load=load, save=save, min_duration=1.0
    ) as processor:

        async def call(n: int) -> None:
            results.append(
                await outcome_of(lambda: processor.run("k", Account.deposit, n))
            )

        tasks = [asyncio.ensure_future(call(10**i)) for i in range(10)]
        await settle()  # all ten queued in the open window
        cancel(tasks[4])
        await asyncio.gather(*tasks, return_exceptions=True)
        assert now() == pytest.approx(1.0)
    return results, data


async def test_asyncio_task_cancel_of_one_caller_leaves_the_others() -> None:
    results, data = await _many_callers_one_cancelled(lambda task: task.cancel())
    assert max(r for r in results if isinstance(r, int)) == 1111101111
    assert len([r for r in results if isinstance(r, int)]) == 9
    assert data == {"k": 1111101111}, "the fifth deposit (10**4) was withdrawn"


async def test_asyncio_double_cancel_of_one_caller_leaves_the_others() -> None:
    def cancel(task: Any) -> None:
        task.cancel()
        task.cancel()

    results, data = await _many_callers_one_cancelled(cancel)
    assert len([r for r in results if isinstance(r, int)]) == 9
    assert data == {"k": 1111101111}


async def test_asyncio_anyio_scope_cancels_one_caller_only() -> None:
    data, load, save = await _asyncio_store()
    results: list[int] = []
    scopes: dict[int, anyio.CancelScope] = {}
    async with keybatch.open_processor(
        load=load, save=save, min_duration=1.0
    ) as processor:

        async def call(n: int) -> None:
            with anyio.CancelScope() as scope:
                scopes[n] = scope
                results.append(await processor.run("k", Account.deposit, n))

        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(call, 10**i)
            await settle()
            scopes[100].cancel()
        assert now() == pytest.approx(1.0)
    assert len(results) == 5
    assert data == {"k": 111011}
    assert processor.statistics().operations_withdrawn == 1


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="Task.cancelling() is new in Python 3.11"
)
async def test_asyncio_caller_with_a_pending_cancel_request_is_withdrawn() -> None:
    """A task that swallowed a cancellation (cancelling() > 0) still works."""
    import asyncio
    import contextlib

    data, load, save = await _asyncio_store()
    async with keybatch.open_processor(
        load=load, save=save, min_duration=0.5
    ) as processor:

        async def stubborn() -> Any:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(1)  # swallowed without uncancel()
            assert task.cancelling() == 1
            return await processor.run("k", Account.deposit, 5)

        other = asyncio.ensure_future(processor.run("k", Account.deposit, 1))
        mine = asyncio.ensure_future(stubborn())
        assert await other == 1
        assert await mine == 6
        assert now() == pytest.approx(0.5)
    assert data == {"k": 6}
