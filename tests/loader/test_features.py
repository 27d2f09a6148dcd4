"""keybatch.loader: what issue 10 added (per-id errors, id checks, chaining,
load_nowait, nested loads, exceptions that pickle).

Every async test runs on trio and asyncio in virtual time (tests/conftest.py).
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Mapping
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keybatch
from keybatch.loader import BatchLoadError, LoadFailed, PendingLoad, open_loader

from ._support import Source, gather
from .test_loader import run_virtual

# ---------------------------------------------------------------------------
# Per-id errors
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_exception_as_a_value_fails_that_id_only() -> None:
    source = Source(errors={2})
    async with open_loader(source, cache=True) as loader:
        out = await gather(loader.load, [1, 2, 2, 3])
        assert out[0] == 10
        assert out[3] == 30
        for exc in out[1:3]:
            assert type(exc) is LoadFailed
            assert isinstance(exc, BatchLoadError)
            assert exc.id == 2
            assert isinstance(exc.__cause__, LookupError)
            assert str(exc.__cause__) == "no row 2"
        assert out[1] is not out[2]
        assert out[1].__cause__ is out[2].__cause__  # chained to the one value
        stats = loader.statistics()
        assert (stats.failed_ids, stats.cached, stats.failed_batches) == (1, 2, 0)
        with pytest.raises(LoadFailed):  # not cached: loaded again
            await loader.load(2)
    assert [sorted(ids) for _, ids in source.calls] == [[1, 2, 3], [2]]


@pytest.mark.anyio
async def test_load_many_raises_the_first_failed_id() -> None:
    source = Source(errors={3}, missing={2})
    async with open_loader(source) as loader:
        with pytest.raises(LoadFailed) as info:
            await loader.load_many([1, 3, 2])
        assert info.value.id == 3
        with pytest.raises(KeyError):
            await loader.load_many([1, 2, 3])


# ---------------------------------------------------------------------------
# Bad ids are refused at the call
# ---------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.timeless
async def test_none_and_unhashable_ids_are_refused_at_the_call() -> None:
    source = Source()
    async with open_loader(source, cache=True) as loader:
        with pytest.raises(TypeError, match="None"):
            await loader.load(None)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="unhashable"):
            await loader.load([1])  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            loader.load_nowait(None)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await loader.load_many([1, None])  # type: ignore[list-item]
        with pytest.raises(TypeError):
            loader.prime({}, 1)  # type: ignore[arg-type]
        assert loader.statistics().loads == 0
    assert source.calls == []


# ---------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_clear_clear_all_and_prime_return_the_loader() -> None:
    source = Source()
    async with open_loader(source, cache=True) as loader:
        await loader.load(1)
        assert loader.clear(1).prime(1, "new") is loader
        assert await loader.load(1) == "new"
        assert loader.clear_all() is loader
        assert loader.prime(2, "two").prime(3, "three") is loader
        assert await loader.load_many([2, 3]) == ["two", "three"]
        with pytest.raises(TypeError, match="exception"):
            loader.prime(4, ValueError("no"))  # type: ignore[arg-type]
    async with open_loader(source) as uncached:
        assert uncached.clear(1).clear_all().prime(1, 1) is uncached


@pytest.mark.anyio
async def test_prime_does_not_replace_a_value_being_loaded() -> None:
    source = Source(delay=1.0)
    async with open_loader(source, cache=True) as loader:
        async with anyio.create_task_group() as tg:
            tg.start_soon(loader.load, 1)
            await anyio.sleep(0.5)
            loader.prime(1, "primed")  # its call is in flight: no-op
        assert await loader.load(1) == 10


@pytest.mark.anyio
async def test_with_the_cache_repeated_ids_do_not_count_towards_max_batch_size() -> (
    None
):
    # Without the cache too, as long as the first window is open; the ids of a
    # closed window that has not started loading are only indexed by the cache.
    source = Source()
    async with open_loader(source, max_batch_size=2, cache=True) as loader:
        assert await gather(loader.load, [1, 1, 1, 2, 2, 3]) == [
            10,
            10,
            10,
            20,
            20,
            30,
        ]
    assert sorted(len(ids) for _, ids in source.calls) == [1, 2]


# ---------------------------------------------------------------------------
# load_nowait
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_load_nowait_enqueues_before_it_returns() -> None:
    source = Source(delay=0.5)
    async with open_loader(source, cache=True) as loader:
        first = loader.load_nowait(1)
        second = loader.load_nowait(2)
        assert isinstance(first, PendingLoad)
        assert (first.id, first.done()) == (1, False)
        assert "pending" in repr(first)
        assert await second == 20  # awaited in any order: one window
        assert first.done()
        assert await first == 10
        assert await first.result() == 10  # again
        hit = loader.load_nowait(1)  # from the cache
        assert hit.done()
        assert await hit == 10
        # coroutines of load() enqueue only when they run: two windows
        c3, c4 = loader.load(3), loader.load(4)
        assert await c3 == 30
        assert await c4 == 40
    assert [ids for _, ids in source.calls] == [[1, 2], [3], [4]]


@pytest.mark.anyio
async def test_a_cancelled_wait_on_a_handle_does_not_withdraw_it() -> None:
    source = Source(delay=1.0)
    async with open_loader(source, max_wait=0.5) as loader:
        handle = loader.load_nowait(7)
        with anyio.move_on_after(0.2):
            await handle
        assert await handle == 70
        assert anyio.current_time() == 1.5
    with pytest.raises(keybatch.ProcessorStopped):
        loader.load_nowait(1)


@pytest.mark.anyio
async def test_handles_of_a_torn_down_loader_raise_processor_stopped() -> None:
    source = Source()
    handles: list[PendingLoad[int]] = []
    with anyio.move_on_after(1):
        async with open_loader(source, max_wait=5.0) as loader:
            handles.append(loader.load_nowait(1))
            await anyio.sleep_forever()
    assert source.calls == []
    with pytest.raises(keybatch.ProcessorStopped, match="torn down"):
        await handles[0]


def test_pending_load_has_no_public_constructor() -> None:
    with pytest.raises(TypeError, match="no public constructor"):
        PendingLoad()


# ---------------------------------------------------------------------------
# Loads made from inside batch_load
# ---------------------------------------------------------------------------


def chained(depth: int) -> Any:
    """A batch_load where id ``100 * level + n`` is worth 1 + the value of the
    id 100 above it, down to ``level == depth``: each level loads the next one
    through the loader (set as ``batch_load.loader``)."""
    calls: list[tuple[float, list[int]]] = []

    async def batch_load(ids: list[int]) -> Mapping[int, int]:
        calls.append((anyio.current_time(), sorted(ids)))
        await anyio.sleep(0.1)
        deeper = [i + 100 for i in ids if i // 100 < depth]
        below = dict(
            zip(deeper, await batch_load.loader.load_many(deeper), strict=True)
        )
        return {i: below[i + 100] + 1 if i // 100 < depth else 0 for i in ids}

    batch_load.calls = calls  # type: ignore[attr-defined]
    return batch_load


@pytest.mark.anyio
@pytest.mark.parametrize("concurrency", [1, 2])
async def test_nested_loads_beyond_concurrency_go_to_later_batches(
    concurrency: int,
) -> None:
    batch_load = chained(5)
    async with open_loader(batch_load, concurrency=concurrency) as loader:
        batch_load.loader = loader
        assert await loader.load(0) == 5
        assert anyio.current_time() == pytest.approx(0.6)
        assert loader.statistics().batches == 6
    assert [ids for _, ids in batch_load.calls] == [[n * 100] for n in range(6)]


@pytest.mark.anyio
async def test_nested_loads_are_accepted_while_the_loader_closes() -> None:
    batch_load = chained(3)
    async with anyio.create_task_group() as tg:
        async with open_loader(batch_load, concurrency=1) as loader:
            batch_load.loader = loader
            tg.start_soon(loader.load, 0)
            await anyio.wait_all_tasks_blocked()
    assert [ids for _, ids in batch_load.calls] == [[0], [100], [200], [300]]
    with pytest.raises(keybatch.ProcessorStopped):
        await loader.load(0)


@pytest.mark.anyio
async def test_a_batch_load_waiting_for_itself_is_told() -> None:
    async def batch_load(ids: list[int]) -> Mapping[int, int]:
        return {i: await loader.load(i) for i in ids}  # the id it is loading

    async with open_loader(batch_load, cache=True) as loader:
        with pytest.raises(BatchLoadError) as info:
            await loader.load(1)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "cycle" in str(info.value.__cause__)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    roots=st.lists(st.integers(0, 99), min_size=1, max_size=8),
    depth=st.integers(0, 6),
    concurrency=st.integers(1, 3),
    max_batch_size=st.none() | st.integers(1, 3),
    cache=st.booleans(),
)
@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_nested_loads_never_deadlock(
    backend: str,
    roots: list[int],
    depth: int,
    concurrency: int,
    max_batch_size: int | None,
    cache: bool,
) -> None:
    async def main() -> list[Any]:
        batch_load = chained(depth)
        async with open_loader(
            batch_load,
            concurrency=concurrency,
            max_batch_size=max_batch_size,
            cache=cache,
        ) as loader:
            batch_load.loader = loader
            return await gather(loader.load, roots)

    got = run_virtual(main, backend)
    assert got == [depth] * len(roots)


# ---------------------------------------------------------------------------
# A batch_load raising KeyboardInterrupt
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_keyboard_interrupt_from_batch_load_leaves_the_block_as_it_is() -> None:
    async def batch_load(ids: list[int]) -> Mapping[int, int]:
        raise KeyboardInterrupt

    caught: list[BaseException] = []

    async def load(loader: Any) -> None:
        try:
            await loader.load(1)
        except BatchLoadError as exc:
            caught.append(exc)

    async with anyio.create_task_group() as outside:
        with pytest.raises(KeyboardInterrupt):
            async with open_loader(batch_load) as loader:
                outside.start_soon(load, loader)
                await anyio.sleep_forever()
    assert len(caught) == 1
    assert isinstance(caught[0].__cause__, KeyboardInterrupt)


# ---------------------------------------------------------------------------
# Exceptions round-trip
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [BatchLoadError, LoadFailed])
def test_exceptions_survive_pickle_and_copy(cls: type[BatchLoadError]) -> None:
    error = cls(("user", 7), "batch_load failed id ('user', 7)")
    for clone in (
        pickle.loads(pickle.dumps(error)),
        copy.copy(error),
        copy.deepcopy(error),
    ):
        assert type(clone) is cls
        assert clone.id == ("user", 7)
        assert str(clone) == str(error)
        assert clone.args == error.args
