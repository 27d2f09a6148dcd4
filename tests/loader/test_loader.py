"""keybatch.loader: windows, duplicates, errors, cache, cancellation.

Every async test runs on trio and asyncio in virtual time (tests/conftest.py);
the property tests run each example on both, through ``run_virtual``.
"""

from __future__ import annotations

import math
from typing import Any

import anyio
import pytest
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keybatch
from keybatch.loader import BatchLoadError, LoaderStatistics, open_loader

from ..conftest import AutojumpLoop
from ._support import Source, gather

pytestmark = pytest.mark.anyio


def run_virtual(fn: Any, backend: str) -> Any:
    """Run ``fn()`` on ``backend`` in virtual time; a run stuck for good fails
    fast instead of hanging (the clock jumps to the guard's deadline)."""

    async def guarded() -> Any:
        with anyio.fail_after(100_000):
            return await fn()

    if backend == "trio":
        options: dict[str, Any] = {
            "clock": trio.testing.MockClock(autojump_threshold=0)
        }
    else:
        options = {"loop_factory": AutojumpLoop}
    return anyio.run(guarded, backend=backend, backend_options=options)


def batches(source: Source) -> list[tuple[float, list[Any]]]:
    """The calls of a source with each batch's ids sorted, in order of time."""
    return sorted((t, sorted(ids)) for t, ids in source.calls)


# ---------------------------------------------------------------------------
# Windows and batches
# ---------------------------------------------------------------------------


async def test_loads_of_one_tick_share_one_batch_load() -> None:
    source = Source(delay=0.5)
    async with open_loader(source) as loader:
        assert await gather(loader.load, [3, 1, 2]) == [30, 10, 20]
        assert anyio.current_time() == 0.5
    assert batches(source) == [(0.0, [1, 2, 3])]


async def test_duplicate_ids_are_loaded_once() -> None:
    source = Source()
    async with open_loader(source) as loader:
        assert await gather(loader.load, [1, 2, 1, 1, 2]) == [10, 20, 10, 10, 20]
        stats = loader.statistics()
    assert batches(source) == [(0.0, [1, 2])]
    assert (stats.loads, stats.batches, stats.ids_loaded) == (5, 1, 2)


async def test_max_wait_collects_loads_of_a_window() -> None:
    source = Source()
    async with open_loader(source, max_wait=0.1) as loader:

        async def late(id: int) -> None:
            await anyio.sleep(0.05)
            await loader.load(id)

        async with anyio.create_task_group() as nursery:
            nursery.start_soon(loader.load, 1)
            nursery.start_soon(late, 2)
        assert anyio.current_time() == 0.1
        await anyio.sleep(0.2)
        assert await loader.load(3) == 30
        assert anyio.current_time() == pytest.approx(0.4)
    assert source.calls[0] == (0.1, [1, 2])
    assert source.calls[1][1] == [3]


async def test_max_batch_size_splits_and_runs_batches_concurrently() -> None:
    source = Source(delay=1.0)
    async with open_loader(source, max_batch_size=2) as loader:
        assert await gather(loader.load, list(range(7))) == [10 * i for i in range(7)]
        assert anyio.current_time() == 1.0  # four batch_load calls at once
    assert sorted(len(ids) for _, ids in source.calls) == [1, 2, 2, 2]
    assert sorted(i for _, ids in source.calls for i in ids) == list(range(7))
    assert source.max_active == 4


@pytest.mark.parametrize(("concurrency", "end"), [(1, 4.0), (2, 2.0), (4, 1.0)])
async def test_concurrency_bounds_batch_loads_in_flight(
    concurrency: int, end: float
) -> None:
    source = Source(delay=1.0)
    async with open_loader(source, max_batch_size=2, concurrency=concurrency) as loader:
        assert await gather(loader.load, list(range(8))) == [10 * i for i in range(8)]
        assert anyio.current_time() == end
    assert source.max_active == concurrency
    assert sorted(i for _, ids in source.calls for i in ids) == list(range(8))


async def test_loads_during_a_batch_load_form_the_next_batch() -> None:
    source = Source(delay=1.0)
    async with open_loader(source, concurrency=2) as loader:
        async with anyio.create_task_group() as nursery:
            nursery.start_soon(loader.load, 1)
            await anyio.sleep(0.5)
            nursery.start_soon(loader.load, 2)
            await anyio.sleep(0.2)
            nursery.start_soon(loader.load, 3)  # both busy: waits for the first
        assert anyio.current_time() == 2.0
    assert source.calls == [(0.0, [1]), (0.5, [2]), (1.0, [3])]


async def test_one_at_a_time_queues_behind_the_batch_in_flight() -> None:
    source = Source(delay=1.0)
    async with open_loader(source, concurrency=1) as loader:
        async with anyio.create_task_group() as nursery:
            nursery.start_soon(loader.load, 1)
            await anyio.sleep(0.5)
            nursery.start_soon(loader.load, 2)
            nursery.start_soon(loader.load, 3)
    assert batches(source) == [(0.0, [1]), (1.0, [2, 3])]


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


async def test_missing_id_raises_key_error_for_its_callers_only() -> None:
    source = Source(missing={2})
    async with open_loader(source) as loader:
        out = await gather(loader.load, [1, 2, 3, 2])
        assert loader.statistics().missing == 1
    assert out[0] == 10
    assert out[2] == 30
    for exc in (out[1], out[3]):
        assert type(exc) is KeyError
        assert exc.args == (2,)
    assert out[1] is not out[3]


async def test_batch_load_failure_reaches_each_caller_as_its_own_exception() -> None:
    failure = ConnectionError("db down")
    source = Source(failures=[failure])
    async with open_loader(source) as loader:
        out = await gather(loader.load, [1, 2, 1])
        assert await loader.load(1) == 10  # failures are not remembered
        stats = loader.statistics()
    assert all(isinstance(exc, BatchLoadError) for exc in out)
    assert len({id(exc) for exc in out}) == 3
    assert [exc.id for exc in out] == [1, 2, 1]
    assert all(exc.__cause__ is failure for exc in out)
    assert (stats.batches, stats.failed_batches) == (2, 1)


async def test_batch_load_returning_no_mapping_fails_the_batch() -> None:
    async def as_list(ids: list[int]) -> Any:
        return [10 * i for i in ids]

    async with open_loader(as_list) as loader:
        with pytest.raises(BatchLoadError) as info:
            await loader.load(1)
    assert isinstance(info.value.__cause__, TypeError)
    assert "mapping" in str(info.value.__cause__)


async def test_unhashable_id_fails_only_its_caller() -> None:
    source = Source()
    async with open_loader(source) as loader:
        out = await gather(loader.load, [1, [2], 3])
    assert out[0] == 10
    assert isinstance(out[1], TypeError)
    assert out[2] == 30


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------


async def test_cache_answers_repeated_loads() -> None:
    source = Source(delay=1.0)
    async with open_loader(source, cache=True) as loader:
        assert await loader.load(1) == 10
        assert await loader.load(1) == 10
        assert anyio.current_time() == 1.0  # the hit did not wait
        assert await loader.load_many([1, 2]) == [10, 20]
        stats = loader.statistics()
    assert source.calls == [(0.0, [1]), (1.0, [2])]
    assert (stats.loads, stats.cache_hits, stats.cached) == (4, 2, 2)


async def test_clear_clear_all_and_prime() -> None:
    source = Source()
    async with open_loader(source, cache=True) as loader:
        await loader.load_many([1, 2, 3])
        loader.clear(1)
        loader.clear(99)  # not cached: nothing happens
        assert await loader.load_many([1, 2]) == [10, 20]
        assert source.calls[-1][1] == [1]
        loader.clear_all()
        assert loader.statistics().cached == 0
        loader.prime(2, "primed")
        loader.prime(2, "not replacing")
        assert await loader.load(2) == "primed"
        loader.clear(2)
        loader.prime(2, "replaced")
        assert await loader.load(2) == "replaced"
        assert await loader.load(3) == 30
    assert [ids for _, ids in source.calls] == [[1, 2, 3], [1], [3]]


async def test_failures_and_missing_ids_are_not_cached() -> None:
    source = Source(missing={2}, failures=[OSError("once")])
    async with open_loader(source, cache=True) as loader:
        with pytest.raises(BatchLoadError):
            await loader.load(1)
        assert await loader.load(1) == 10
        for _ in range(2):
            with pytest.raises(KeyError):
                await loader.load(2)
    assert [ids for _, ids in source.calls] == [[1], [1], [2], [2]]


async def test_clear_during_a_batch_load_keeps_its_values_out_of_the_cache() -> None:
    source = Source(delay=1.0)
    async with open_loader(source, cache=True) as loader:
        async with anyio.create_task_group() as nursery:
            nursery.start_soon(loader.load, 1)
            await anyio.sleep(0.5)
            loader.clear(1)  # the stored value changed while it was being read
        assert loader.statistics().cached == 0
        await loader.load(1)
        assert loader.statistics().cached == 1
    assert len(source.calls) == 2


async def test_cache_methods_are_no_ops_without_a_cache() -> None:
    source = Source()
    async with open_loader(source) as loader:
        loader.prime(1, "primed")
        loader.clear(1)
        loader.clear_all()
        assert await loader.load(1) == 10
        assert await loader.load(1) == 10
    assert len(source.calls) == 2


# ---------------------------------------------------------------------------
# load_many
# ---------------------------------------------------------------------------


async def test_load_many_keeps_order_and_shares_the_window() -> None:
    source = Source()
    async with open_loader(source) as loader:
        out = await gather(loader.load_many, [[3, 1], [1, 2]])
        assert out == [[30, 10], [10, 20]]
        assert await loader.load_many([]) == []
        assert await loader.load_many([5, 4, 5]) == [50, 40, 50]
    assert batches(source) == [(0.0, [1, 2, 3]), (0.0, [4, 5])]
    assert source.calls[1][1] == [5, 4]  # one load_many: its order


async def test_load_many_raises_the_first_failure() -> None:
    source = Source(missing={2, 3})
    async with open_loader(source) as loader:
        with pytest.raises(KeyError) as info:
            await loader.load_many([1, 3, 2])
        assert info.value.args == (3,)


# ---------------------------------------------------------------------------
# Cancellation
# ---------------------------------------------------------------------------


async def test_cancelled_load_before_its_batch_is_withdrawn() -> None:
    source = Source()
    async with open_loader(source, max_wait=1.0) as loader:
        async with anyio.create_task_group() as nursery:
            nursery.start_soon(loader.load, 1)
            with anyio.move_on_after(0.5):
                await loader.load(2)
        assert await loader.load(3) == 30
    assert [ids for _, ids in source.calls] == [[1], [3]]


async def test_cancelled_load_does_not_cancel_its_batch_for_the_others() -> None:
    source = Source(delay=1.0)
    async with open_loader(source, cache=True) as loader:
        results: list[int] = []

        async def load(id: int) -> None:
            results.append(await loader.load(id))

        async def cancelled_load(id: int) -> None:
            with anyio.move_on_after(0.5) as scope:
                await loader.load(id)  # in the same batch, in flight at 0.5
            assert scope.cancelled_caught

        async with anyio.create_task_group() as nursery:
            nursery.start_soon(load, 1)
            nursery.start_soon(cancelled_load, 2)
        assert anyio.current_time() == 1.0
        assert results == [10]
        assert loader.statistics().cached == 2  # the batch finished and cached 2
    assert batches(source) == [(0.0, [1, 2])]


async def test_cancelled_load_many_leaves_nothing_behind() -> None:
    source = Source(delay=1.0)
    async with open_loader(source) as loader:
        with anyio.move_on_after(0.5):
            await loader.load_many([1, 2])
        assert loader.statistics().batches_in_flight == 1
        assert await loader.load_many([1, 2, 3]) == [10, 20, 30]  # no cache
        assert loader.statistics().batches_in_flight == 0
    assert source.calls == [(0.0, [1, 2]), (0.5, [1, 2, 3])]


async def test_with_the_cache_loads_share_a_batch_load_in_flight() -> None:
    source = Source(delay=1.0)
    async with open_loader(source, cache=True) as loader:
        async with anyio.create_task_group() as nursery:
            nursery.start_soon(loader.load, 1)
            await anyio.sleep(0.5)
            assert await loader.load_many([1, 2]) == [10, 20]  # 1 shared
            assert anyio.current_time() == 1.5
            assert await loader.load(1) == 10  # cached now
        stats = loader.statistics()
    assert source.calls == [(0.0, [1]), (0.5, [2])]
    assert (stats.loads, stats.shared_loads, stats.cache_hits) == (4, 1, 1)


async def test_shared_failure_reaches_each_caller_as_its_own_exception() -> None:
    failure = OSError("down")
    source = Source(delay=1.0, failures=[failure])
    async with open_loader(source, cache=True) as loader:
        out: list[Any] = []

        async def one() -> None:
            try:
                await loader.load(1)
            except BatchLoadError as exc:
                out.append(exc)

        async with anyio.create_task_group() as nursery:
            nursery.start_soon(one)
            await anyio.sleep(0.5)
            nursery.start_soon(one)  # shares the call in flight
            nursery.start_soon(one)
        assert await loader.load(1) == 10  # the failure was not cached
    assert len(out) == 3
    assert len({id(exc) for exc in out}) == 3
    assert all(exc.__cause__ is failure for exc in out)
    assert len(source.calls) == 2


async def test_clear_makes_the_next_load_skip_the_call_in_flight() -> None:
    source = Source(delay=1.0)
    async with open_loader(source, cache=True) as loader:
        async with anyio.create_task_group() as nursery:
            nursery.start_soon(loader.load, 1)
            await anyio.sleep(0.5)
            loader.clear(1)  # the row changed: do not share the stale read
            assert await loader.load(1) == 10
    assert source.calls == [(0.0, [1]), (0.5, [1])]


async def test_closing_waits_for_loads_then_refuses() -> None:
    source = Source(delay=1.0)
    results: list[int] = []
    async with anyio.create_task_group() as nursery:
        async with open_loader(source, max_wait=5.0) as loader:

            async def load(id: int) -> None:
                results.append(await loader.load(id))

            nursery.start_soon(load, 1)
            await anyio.wait_all_tasks_blocked()
            start = anyio.current_time()  # 0.1 on asyncio: anyio's polling
        assert anyio.current_time() == start + 1.0  # the window closed at once
    assert results == [10]
    with pytest.raises(keybatch.ProcessorStopped):
        await loader.load(2)


async def test_teardown_lets_the_batch_in_flight_finish() -> None:
    source = Source(delay=1.0)
    with anyio.move_on_after(0.5):
        async with open_loader(source) as loader, anyio.create_task_group() as nursery:
            nursery.start_soon(loader.load, 1)
            await anyio.sleep_forever()
    assert anyio.current_time() == 1.0  # batch_load is shielded
    assert loader.statistics().batches_in_flight == 0


# ---------------------------------------------------------------------------
# Bad input, and invariants
# ---------------------------------------------------------------------------


def test_bad_options_are_refused_when_opening() -> None:
    source = Source()

    def sync_load(ids: list[int]) -> dict[int, int]:
        return {}

    with pytest.raises(TypeError, match="batch_load must be an async function"):
        open_loader(sync_load)  # type: ignore[arg-type]
    kwargs: dict[str, Any]
    for kwargs in (
        {"max_wait": -1},
        {"max_wait": math.inf},
        {"max_batch_size": 0},
        {"concurrency": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            open_loader(source, **kwargs)
    for kwargs in (
        {"max_wait": "0"},
        {"max_batch_size": 2.0},
        {"concurrency": True},
        {"cache": 1},
    ):
        with pytest.raises(TypeError, match=next(iter(kwargs))):
            open_loader(source, **kwargs)
    with pytest.raises(TypeError, match="no public constructor"):
        keybatch.loader.Loader()  # type: ignore[call-arg]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(
        st.tuples(st.integers(0, 15), st.sampled_from([0.0, 0.0, 0.1, 0.7])),
        max_size=50,
    ),
    max_wait=st.sampled_from([0.0, 0.25]),
    max_batch_size=st.none() | st.integers(1, 5),
    concurrency=st.integers(1, 3),
    cache=st.booleans(),
    delay=st.sampled_from([0.0, 0.5]),
)
@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_every_caller_gets_its_own_value(
    backend: str,
    requests: list[tuple[int, float]],
    max_wait: float,
    max_batch_size: int | None,
    concurrency: int,
    cache: bool,
    delay: float,
) -> None:
    source = Source(delay=delay, missing={13})
    outcomes: dict[int, Any] = {}

    async def main() -> LoaderStatistics:
        async with (
            open_loader(
                source,
                max_wait=max_wait,
                max_batch_size=max_batch_size,
                concurrency=concurrency,
                cache=cache,
            ) as loader,
            anyio.create_task_group() as nursery,
        ):

            async def one(n: int, id: int) -> None:
                try:
                    outcomes[n] = await loader.load(id)
                except KeyError as exc:
                    outcomes[n] = exc

            for n, (id, pause) in enumerate(requests):
                nursery.start_soon(one, n, id)
                if pause:
                    await anyio.sleep(pause)
        return loader.statistics()

    stats = run_virtual(main, backend)
    for n, (id, _) in enumerate(requests):
        if id == 13:
            assert isinstance(outcomes[n], KeyError)
        else:
            assert outcomes[n] == 10 * id
    for _, ids in source.calls:
        assert len(ids) == len(set(ids))
        if max_batch_size is not None:
            assert len(ids) <= max_batch_size
    assert source.max_active <= concurrency
    assert stats.loads == len(requests)
    assert stats.batches == len(source.calls)
    assert stats.batches_in_flight == 0


# ---------------------------------------------------------------------------
# asyncio subset
# ---------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
async def test_asyncio_batches_dedupes_and_reports_missing() -> None:
    source = Source(missing={4})
    async with open_loader(source) as loader:
        out = await gather(loader.load, [1, 2, 1, 4])
    assert out[:3] == [10, 20, 10]
    assert isinstance(out[3], KeyError)
    assert source.calls[0][1] == [1, 2, 4]
    assert len(source.calls) == 1


@pytest.mark.anyio
async def test_asyncio_failure_and_cache() -> None:
    failure = OSError("down")
    source = Source(failures=[failure])
    async with open_loader(source, cache=True) as loader:
        out = await gather(loader.load, [1, 2])
        assert all(isinstance(exc, BatchLoadError) for exc in out)
        assert out[0] is not out[1]
        assert out[0].__cause__ is failure
        assert await loader.load_many([1, 2]) == [10, 20]
        assert await loader.load(2) == 20
    assert len(source.calls) == 2


@pytest.mark.anyio
async def test_asyncio_cancelled_load_does_not_cancel_the_batch() -> None:
    started = anyio.Event()
    release = anyio.Event()

    async def slow(ids: list[int]) -> dict[int, int]:
        started.set()
        await release.wait()
        return {i: -i for i in ids}

    results: list[int] = []
    async with open_loader(slow) as loader:
        async with anyio.create_task_group() as tg:

            async def keep(id: int) -> None:
                results.append(await loader.load(id))

            tg.start_soon(keep, 1)
            async with anyio.create_task_group() as cancelled:
                cancelled.start_soon(loader.load, 2)
                await started.wait()
                cancelled.cancel_scope.cancel()
            release.set()
    assert results == [-1]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    calls=st.lists(
        st.tuples(
            st.integers(0, 8),
            st.sampled_from([0.0, 0.1, 0.3, 0.6]),  # when it starts
            st.none() | st.sampled_from([0.0, 0.05, 0.2, 0.25, 0.5, 1.0]),
        ),
        max_size=25,
    ),
    max_wait=st.sampled_from([0.0, 0.2]),
    max_batch_size=st.none() | st.integers(1, 3),
    cache=st.booleans(),
    delay=st.sampled_from([0.0, 0.25]),
)
@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_cancelled_load_at_any_point_leaves_nothing_stuck(
    backend: str,
    calls: list[tuple[int, float, float | None]],
    max_wait: float,
    max_batch_size: int | None,
    cache: bool,
    delay: float,
) -> None:
    source = Source(delay=delay, missing={8})
    got: dict[int, Any] = {}

    async def main() -> None:
        async with open_loader(
            source, max_wait=max_wait, max_batch_size=max_batch_size, cache=cache
        ) as loader:
            async with anyio.create_task_group() as nursery:
                for n, (id, start, cancel_after) in enumerate(calls):

                    async def one(n: int, id: int, start: float, cancel: Any) -> None:
                        await anyio.sleep(start)
                        with anyio.move_on_after(
                            math.inf if cancel is None else cancel
                        ):
                            try:
                                got[n] = await loader.load(id)
                            except KeyError as exc:
                                got[n] = exc

                    nursery.start_soon(one, n, id, start, cancel_after)
            assert await loader.load(3) == 30  # still works
        # A batch whose callers were all cancelled still finished.
        assert loader.statistics().batches_in_flight == 0

    run_virtual(main, backend)
    for n, value in got.items():
        id = calls[n][0]
        if id == 8:
            assert isinstance(value, KeyError)
        else:
            assert value == 10 * id
    for n, (_, _, cancel_after) in enumerate(calls):
        if cancel_after is None:
            assert n in got
    for _, ids in source.calls:
        assert len(ids) == len(set(ids))
