"""The writer faults of issue 10, one test each (they failed before the fix).

Every test runs on trio and asyncio in virtual time (tests/conftest.py).
"""

from __future__ import annotations

import math
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keybatch
from keybatch.writer import DependencyFailed, WriteError, open_writer

from ..loader.test_loader import run_virtual
from ._support import Errors, Sink

pytestmark = pytest.mark.anyio


async def test_fault_1_jitter_is_drawn_per_flush() -> None:
    sink = Sink()
    async with open_writer(
        sink, flush_interval=1.0, jitter=0.5, concurrent_flushes=40
    ) as writer:
        for key in range(40):
            await writer.write(key, key=key)
        await anyio.sleep(2)
    times = [t for t, _, _ in sink.calls]
    assert len(times) == 40
    assert all(1.0 <= t <= 1.5 for t in times)
    assert len(set(times)) > 20  # spread out, not one instant


async def test_fault_2_a_held_item_never_blocks_unrelated_keys() -> None:
    sink = Sink(delays={"objects": 2.0})
    async with open_writer(sink, batch_size=1) as writer:
        await writer.write("obj", key="objects", id="obj-1")
        await writer.write("ref", key="refs", after=["obj-1"])
        await writer.write("free", key="other")
        await anyio.sleep(1)
        assert "free" in sink.written()
        assert sink.times("free") == [0.0]
    assert sink.times("ref") == [2.0]


async def test_fault_3_every_key_is_checked_at_write_held_or_not() -> None:
    # A key the old router refused (a str that is not UTF-8 encodable) and a key
    # whose hash raises: the first is a fine dict key, the second is refused.
    class Unhashable:
        def __hash__(self) -> int:
            raise TypeError("no hash")

    errors = Errors()
    reports: list[Any] = []
    sink = Sink()
    async with open_writer(sink, on_error=errors, on_flush=reports.append) as writer:
        await writer.write("obj", key="objects", id="o1")
        with pytest.raises(TypeError):
            await writer.write("bad", key=Unhashable(), after=["o1"])
        with pytest.raises(TypeError):
            writer.write_nowait("bad", key=Unhashable())
        await writer.write("odd", key="\ud800", after=["o1"])
        await writer.write("valid", key="\ud800")
    stats = writer.statistics()
    assert sorted(sink.written()) == ["obj", "odd", "valid"]
    assert (stats.items_written, stats.dropped_items, stats.failed_items) == (3, 0, 0)
    assert reports


@pytest.mark.parametrize("seed", range(12))
async def test_fault_4_flush_waits_for_held_write_sync_items(seed: int) -> None:
    delay = [0.0, 0.1, 0.5][seed % 3]
    sink = Sink(delay=delay)
    done: list[str] = []
    async with open_writer(sink, flush_interval=10) as writer:
        async with anyio.create_task_group() as tg:
            await writer.write("obj", key="objects", id="o1")

            async def sync(n: int) -> None:
                await writer.write_sync(f"ref{n}", key=f"refs{n % 2}", after=["o1"])
                done.append(f"ref{n}")

            for n in range(seed % 4 + 1):
                tg.start_soon(sync, n)
            await anyio.wait_all_tasks_blocked()
            await writer.flush()
            written = sink.written()
            assert all(f"ref{n}" in written for n in range(seed % 4 + 1))


async def test_fault_5_a_refused_waiter_does_not_lose_the_room() -> None:
    sink = Sink()
    arrived: list[float] = []
    async with open_writer(sink, max_buffered=1) as writer:
        await writer.write("a", id="a")
        async with anyio.create_task_group() as tg:

            async def refused() -> None:
                with pytest.raises(ValueError, match="already buffered"):
                    await writer.write("dup", id="a")

            async def refused_key() -> None:
                with pytest.raises(TypeError):
                    await writer.write("bad", key=[])  # type: ignore[arg-type]

            async def accepted() -> None:
                await writer.write("c")
                arrived.append(anyio.current_time())

            tg.start_soon(refused)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(refused_key)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(accepted)
    assert arrived == [1.0]  # the first flush made room for it
    assert sink.written() == ["a", "c"]


async def test_fault_6_callers_outside_a_cancelled_owner_are_told() -> None:
    # One slot, taken by a long flush: the other items wait in the buffer.
    sink = Sink(delays={"busy": 5.0})
    outcomes: dict[str, BaseException] = {}
    with anyio.fail_after(100):
        async with anyio.create_task_group() as outside:
            with anyio.CancelScope() as owner:
                async with open_writer(
                    sink, batch_size=1, concurrent_flushes=1
                ) as writer:
                    await writer.write("x", key="busy")
                    await writer.write("obj", id="o1")

                    async def call(name: str, fn: Any) -> None:
                        try:
                            await fn()
                        except keybatch.ProcessorStopped as exc:
                            outcomes[name] = exc

                    outside.start_soon(call, "sync", lambda: writer.write_sync("s"))
                    outside.start_soon(
                        call, "held", lambda: writer.write_sync("h", after=["o1"])
                    )
                    outside.start_soon(call, "flush", writer.flush)
                    await anyio.wait_all_tasks_blocked()
                    owner.cancel()
                    await anyio.sleep_forever()
    assert sorted(outcomes) == ["flush", "held", "sync"]
    for fn in (lambda: writer.write_sync("late"), writer.flush):
        with pytest.raises(keybatch.ProcessorStopped):
            await fn()


async def test_fault_9_an_infinite_backoff_does_not_hold_the_block_open() -> None:
    sink = Sink(script=[OSError("down")] * 10)
    errors = Errors()
    with anyio.move_on_after(5):
        async with open_writer(
            sink, backoff=lambda retry: math.inf, on_error=errors
        ) as writer:
            await writer.write("a")
            await anyio.sleep_forever()
    assert anyio.current_time() == 5.0
    assert errors.items() == ["a"]
    assert isinstance(errors.calls[0][2], OSError)
    stats = writer.statistics()
    assert (stats.failed_items, stats.buffered, stats.dropped_items) == (1, 0, 0)


async def test_fault_9_a_huge_backoff_is_bounded() -> None:
    sink = Sink(script=[OSError("down")])
    async with open_writer(sink, backoff=lambda retry: 1e12) as writer:
        await writer.write_sync("a")
    assert [t for t, _, _ in sink.calls] == [1.0, 301.0]


async def test_fault_10_a_str_or_bytes_after_is_refused() -> None:
    sink = Sink()
    async with open_writer(sink) as writer:
        await writer.write("art", id="art-1")
        for after in ("art-1", b"art-1"):
            with pytest.raises(TypeError, match="after"):
                await writer.write("ref", after=after)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="after"):
                writer.write_nowait("ref", after=after)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="after"):
                await writer.write_sync("ref", after=after)  # type: ignore[arg-type]
        assert writer.statistics().buffered == 1
    assert sink.written() == ["art"]


async def test_fault_11_a_sink_raising_keyboard_interrupt() -> None:
    sink = Sink(script=[KeyboardInterrupt()])
    errors = Errors()
    caught: list[BaseException] = []

    async def sync(writer: Any) -> None:
        try:
            await writer.write_sync("s", key="k")
        except keybatch.ProcessorStopped as exc:
            caught.append(exc)

    async with anyio.create_task_group() as outside:
        with pytest.raises(KeyboardInterrupt):  # by itself, not in a group
            async with open_writer(sink, on_error=errors, flush_interval=1) as writer:
                await writer.write("other", key="other")
                await anyio.sleep(0.5)
                outside.start_soon(sync, writer)
                await anyio.sleep_forever()
    assert anyio.current_time() == 1.0
    stats = writer.statistics()
    # "other" flushed at 1.0 and met the interrupt; "s" was never flushed.
    assert [items for _, _, items in sink.calls] == [["other"]]
    assert (stats.failed_items, stats.dropped_items, stats.buffered) == (1, 1, 0)
    assert errors.items() == ["other", "s"]
    assert isinstance(errors.calls[0][2], KeyboardInterrupt)
    assert isinstance(errors.calls[1][2], keybatch.ProcessorStopped)
    assert len(caught) == 1


async def test_fault_11_write_sync_in_the_interrupted_flush_is_told_the_truth() -> None:
    sink = Sink(script=[KeyboardInterrupt()])
    caught: list[BaseException] = []

    async def sync(writer: Any) -> None:
        try:
            await writer.write_sync("s")
        except WriteError as exc:
            caught.append(exc)

    async with anyio.create_task_group() as outside:
        with pytest.raises(KeyboardInterrupt):
            async with open_writer(sink, flush_interval=1) as writer:
                outside.start_soon(sync, writer)
                await anyio.sleep_forever()
    assert len(caught) == 1
    assert "after 1 attempt" in str(caught[0])
    assert isinstance(caught[0].__cause__, KeyboardInterrupt)
    stats = writer.statistics()
    assert (stats.failed_items, stats.dropped_items) == (1, 0)


async def test_fault_13_close_timeout_bounds_a_hung_sink() -> None:
    sink = Sink(delay=math.inf)
    errors = Errors()
    async with open_writer(sink, close_timeout=3, on_error=errors) as writer:
        await writer.write("a")
        await anyio.sleep(2)  # "a" is in the hung sink call since 1.0
        await writer.write("b")
    assert anyio.current_time() == 5.0
    stats = writer.statistics()
    assert (stats.items_written, stats.failed_items, stats.dropped_items) == (0, 1, 1)
    assert sorted(errors.items()) == ["a", "b"]
    interrupted = next(exc for _, items, exc in errors.calls if items == ["a"])
    assert isinstance(interrupted, WriteError)
    assert interrupted.may_have_landed


async def test_fault_13_close_timeout_under_an_outer_deadline() -> None:
    sink = Sink(delay=math.inf)
    with anyio.move_on_after(2):
        async with open_writer(sink, close_timeout=3) as writer:
            await writer.write("a")
            await anyio.sleep_forever()
    assert anyio.current_time() == 5.0
    assert writer.statistics().failed_items == 1


async def test_fault_13_failed_ids_are_bounded() -> None:
    sink = Sink(script=[ValueError("no")] * 5)
    async with open_writer(sink, batch_size=1, max_failed_ids=3) as writer:
        for n in range(5):
            with pytest.raises(WriteError):
                await writer.write_sync(n, id=n)
        # ids 0 and 1 were forgotten: they count as written; 2 to 4 fail.
        await writer.write("after-0", after=[0])
        for n in (2, 3, 4):
            with pytest.raises(DependencyFailed):
                await writer.write_sync(f"after-{n}", after=[n])


async def test_fault_13_flush_during_teardown_raises() -> None:
    sink = Sink(delay=1.0)
    raised: list[BaseException] = []
    async with anyio.create_task_group() as outside:
        with anyio.CancelScope() as owner:
            async with open_writer(sink, flush_interval=10) as writer:
                await writer.write("a")
                await writer.write("b", key="other", id="b")
                await writer.write("c", after=["b"])

                async def flush() -> None:
                    try:
                        await writer.flush()
                    except keybatch.ProcessorStopped as exc:
                        raised.append(exc)

                outside.start_soon(flush)
                await anyio.sleep(0.5)  # a and b are in flushes; c is held
                owner.cancel()
                await anyio.sleep_forever()
    assert len(raised) == 1
    assert sorted(sink.written()) == ["a", "b"]
    assert writer.statistics().dropped_items == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=st.lists(
        st.tuples(
            st.sampled_from("abc"),  # key
            st.lists(st.integers(1, 3), max_size=2),  # after: how many items back
            st.booleans(),  # write_sync
            st.sampled_from([0.0, 0.0, 0.2]),  # pause after it
        ),
        min_size=1,
        max_size=15,
    ),
    flush_after=st.integers(0, 15),
    delay=st.sampled_from([0.0, 0.1, 0.5]),
    script=st.lists(st.booleans(), max_size=5),
)
@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_fault_4_flush_covers_every_item_accepted_before_it(
    backend: str,
    items: list[tuple[str, list[int], bool, float]],
    flush_after: int,
    delay: float,
    script: list[bool],
) -> None:
    sink = Sink(delay=delay, script=[ValueError("no") if s else None for s in script])
    finished: set[int] = set()
    errors = Errors()

    async def main() -> None:
        async with (
            open_writer(
                sink, flush_interval=10, batch_size=3, on_error=errors
            ) as writer,
            anyio.create_task_group() as tg,
        ):
            accepted: list[int] = []
            for n, (key, back, sync, pause) in enumerate(items):
                after = [n - b for b in back if n - b >= 0]
                if sync:

                    async def one(n: int, key: str, after: list[int]) -> None:
                        try:
                            await writer.write_sync(n, key=key, id=n, after=after)
                        except WriteError:
                            pass
                        finally:
                            finished.add(n)

                    tg.start_soon(one, n, key, after)
                    await anyio.wait_all_tasks_blocked()  # it was accepted
                else:
                    await writer.write(n, key=key, id=n, after=after)
                accepted.append(n)
                if n == flush_after:
                    covered = set(accepted)
                    await writer.flush()
                    written = set(sink.written())
                    failed = set(errors.items())
                    # every item accepted before the call was written or failed
                    assert covered <= written | failed
                if pause:
                    await anyio.sleep(pause)

    run_virtual(main, backend)
