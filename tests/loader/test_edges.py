"""keybatch.loader: the rarer paths (a block that raises, withdrawals by
load_many, a cycle found half-way through load_many, reprs).

Every async test runs on trio and asyncio in virtual time (tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import pytest

import keybatch
from keybatch.loader import BatchLoadError, open_loader

from ._support import Source

pytestmark = pytest.mark.anyio


async def test_the_blocks_own_exception_comes_out_as_it_went_in() -> None:
    source = Source(delay=1.0)
    outcomes: list[Any] = []

    async def load(loader: Any, id: int) -> None:
        try:
            outcomes.append(await loader.load(id))
        except keybatch.ProcessorStopped as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as outside:
        with pytest.raises(RuntimeError, match="boom"):
            async with open_loader(source, max_wait=5.0) as loader:
                outside.start_soon(load, loader, 1)
                await anyio.sleep(0.5)
                raise RuntimeError("boom")
    assert len(outcomes) == 1
    assert isinstance(outcomes[0], keybatch.ProcessorStopped)
    assert source.calls == []
    assert repr(loader) == "<keybatch.loader.Loader closed cache=off in_flight=0>"


async def test_cancelled_load_many_withdraws_what_has_not_started() -> None:
    source = Source()
    async with open_loader(source, max_wait=1.0, cache=True) as loader:
        assert repr(loader) == "<keybatch.loader.Loader open cache=on in_flight=0>"
        with anyio.move_on_after(0.5):
            await loader.load_many([1, 2, 2])
        assert await loader.load(3) == 30
    assert [ids for _, ids in source.calls] == [[3]]


async def test_a_cycle_half_way_through_load_many_takes_back_the_rest() -> None:
    seen: list[list[int]] = []

    async def batch_load(ids: list[int]) -> Mapping[int, int]:
        seen.append(sorted(ids))
        if 1 in ids:
            # 5 is new, 1 is being loaded by this very call: a cycle
            await loader.load_many([5, 1])
        return {i: i for i in ids}

    async with open_loader(batch_load, cache=True) as loader:
        with pytest.raises(BatchLoadError) as info:
            await loader.load(1)
        assert isinstance(info.value.__cause__, RuntimeError)
        assert await loader.load(5) == 5
    assert seen == [[1], [5]]  # 5 was withdrawn before any window loaded it


async def test_nested_loads_hit_the_cache_while_the_loader_closes() -> None:
    calls: list[list[int]] = []

    async def batch_load(ids: list[int]) -> Mapping[int, int]:
        calls.append(sorted(ids))
        if 0 in ids:
            await anyio.sleep(1)
            return {0: await loader.load(7)}  # cached before the close
        return {i: i for i in ids}

    async with anyio.create_task_group() as tg:
        async with open_loader(batch_load, cache=True) as loader:
            assert await loader.load(7) == 7
            tg.start_soon(loader.load, 0)
            await anyio.wait_all_tasks_blocked()
    assert calls == [[7], [0]]
