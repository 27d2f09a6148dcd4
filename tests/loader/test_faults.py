"""The loader faults of issue 10, one test each (they failed before the fix).

Every test runs on trio and asyncio in virtual time (tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import pytest

import keybatch
from keybatch.loader import open_loader

from ._support import Source

pytestmark = pytest.mark.anyio


async def test_fault_6_loads_outside_a_cancelled_owner_are_told() -> None:
    source = Source(delay=1.0)
    outcomes: dict[int, Any] = {}
    with anyio.fail_after(100):
        async with anyio.create_task_group() as outside:
            with anyio.CancelScope() as owner:
                async with open_loader(source, concurrency=1) as loader:

                    async def load(id: int) -> None:
                        try:
                            outcomes[id] = await loader.load(id)
                        except keybatch.ProcessorStopped as exc:
                            outcomes[id] = exc

                    async def late() -> None:
                        # during the teardown, which waits for the batch_load
                        # of 1 (until 1.0)
                        await anyio.sleep(0.7)
                        await load(3)

                    outside.start_soon(load, 1)
                    outside.start_soon(late)
                    await anyio.sleep(0.5)
                    outside.start_soon(load, 2)  # waits for the slot
                    await anyio.sleep(0.1)
                    owner.cancel()
                    await anyio.sleep_forever()
            assert anyio.current_time() == 1.0
    assert outcomes[1] == 10
    assert isinstance(outcomes[2], keybatch.ProcessorStopped)
    assert isinstance(outcomes[3], keybatch.ProcessorStopped)
    with pytest.raises(keybatch.ProcessorStopped):
        await loader.load(3)


async def test_fault_7_load_many_with_a_shared_call_that_ended_first() -> None:
    source = Source(delay=1.0)
    with anyio.fail_after(100):
        async with open_loader(source, cache=True) as loader:
            async with anyio.create_task_group() as tg:
                tg.start_soon(loader.load, 1)
                await anyio.sleep(0.5)
                # 1 shares the call in flight (ends at 1.0); 2 is loaded at 0.5
                # and ends at 1.5, after 1's call ended.
                assert await loader.load_many([2, 1]) == [20, 10]
                assert anyio.current_time() == 1.5


async def test_fault_8_a_closed_loader_answers_nothing() -> None:
    source = Source()
    async with open_loader(source, cache=True) as loader:
        assert await loader.load(1) == 10
    with pytest.raises(keybatch.ProcessorStopped):
        await loader.load(1)  # cached, but the loader is closed
    with pytest.raises(keybatch.ProcessorStopped):
        await loader.load_many([1])
    with pytest.raises(keybatch.ProcessorStopped):
        loader.prime(2, 20)


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_fault_12_batch_load_may_load_through_its_own_loader(
    concurrency: int,
) -> None:
    calls: list[list[int]] = []

    async def batch_load(ids: list[int]) -> Mapping[int, Any]:
        calls.append(sorted(ids))
        out: dict[int, Any] = {}
        for i in ids:
            # ids below 100 are made of the id 100 above them, loaded again
            out[i] = (await loader.load(i + 100)) + 1 if i < 100 else i
        return out

    with anyio.fail_after(100):
        async with open_loader(batch_load, concurrency=concurrency) as loader:
            got = await keybatch_gather(loader.load, [1, 2, 3])
    assert got == [102, 103, 104]
    assert sorted(calls)[0] == [1, 2, 3]


async def keybatch_gather(fn: Any, args: list[Any]) -> list[Any]:
    out: list[Any] = [None] * len(args)

    async def one(i: int, arg: Any) -> None:
        out[i] = await fn(arg)

    async with anyio.create_task_group() as tg:
        for i, arg in enumerate(args):
            tg.start_soon(one, i, arg)
    return out
