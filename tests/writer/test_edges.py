"""keybatch.writer: the rarer paths (a waiter refused after it got room, a close
under way, withdrawals while queued, sinks that raise a cancellation).

Every async test runs on trio and asyncio in virtual time (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import anyio
import pytest

import keybatch
from keybatch.writer import DependencyFailed, FlushReport, WriteError, open_writer

from ._support import Errors, Sink

pytestmark = pytest.mark.anyio


async def test_a_waiter_refused_after_it_got_room_passes_it_on() -> None:
    sink = Sink(delay=1.0)
    outcomes: dict[str, Any] = {}

    def on_flush(report: FlushReport) -> None:
        # runs once the flush freed its room, before the waiters resume: an
        # item with the id the first waiter asked for is accepted meanwhile
        if report.items == 2:
            writer.write_nowait("h", id="x")

    async with open_writer(
        sink, batch_size=2, max_buffered=2, on_flush=on_flush
    ) as writer:
        await writer.write("a")
        await writer.write("b")  # a full batch: in the sink from 0.0 to 1.0

        async def one(name: str, **kwargs: Any) -> None:
            try:
                await writer.write(name, **kwargs)
                outcomes[name] = anyio.current_time()
            except ValueError as exc:
                outcomes[name] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(one, "dup", id="x"))  # not a duplicate yet: waits
        assert anyio.current_time() == 1.0
        await one("c")  # the room it was given was not lost
        assert writer.statistics().buffered == 2
    assert isinstance(outcomes["dup"], ValueError)
    assert outcomes["c"] == 1.0
    assert sorted(sink.written()) == ["a", "b", "c", "h"]


async def test_write_nowait_of_an_item_after_a_failed_id_fails_it_at_once() -> None:
    sink = Sink(script=[ValueError("no")])
    errors = Errors()
    async with open_writer(sink, on_error=errors) as writer:
        with pytest.raises(WriteError):
            await writer.write_sync("o", id="o1")
        writer.write_nowait("ref", after=["o1"])
        await writer.write("ref2", after={"o1"})
        with pytest.raises(DependencyFailed):
            await writer.write_sync("ref3", after=("o1",))
    assert errors.items() == ["o", "ref", "ref2", "ref3"]
    assert writer.statistics().failed_items == 4


async def test_calls_while_closing_are_refused() -> None:
    sink = Sink(delay=1.0)
    async with open_writer(sink) as writer:
        await writer.write("a", id="a")
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.aclose)
            await anyio.sleep(0.5)  # the close is under way
            for call in (
                lambda: writer.write("b", id="b"),
                lambda: writer.write_sync("b", after=["a"]),
            ):
                with pytest.raises(keybatch.ProcessorStopped):
                    await call()
            with pytest.raises(keybatch.ProcessorStopped):
                writer.write_nowait("b", id="b")
            assert await writer.aclose() == []  # waits for the close under way
            assert anyio.current_time() == 1.0
    assert repr(writer) == "<keybatch.writer.Writer closed buffered=0>"


async def test_flush_during_a_graceful_close_returns() -> None:
    sink = Sink(delay=1.0)
    returned: list[float] = []
    async with anyio.create_task_group() as tg:
        async with open_writer(sink, flush_interval=10) as writer:
            await writer.write("a", key="a", id="a")
            await writer.write("b", key="b", after=["a"])

            async def flush() -> None:
                await anyio.sleep(0.5)
                await writer.flush()
                returned.append(anyio.current_time())

            tg.start_soon(flush)
            assert repr(writer) == "<keybatch.writer.Writer open buffered=2>"
    assert returned == [2.0]  # a at 0.0-1.0, then b at 1.0-2.0
    assert sink.written() == ["a", "b"]


async def test_a_write_sync_withdrawn_while_its_key_waits_for_a_slot() -> None:
    sink = Sink(delays={"busy": 2.0})
    async with open_writer(sink, batch_size=1, concurrent_flushes=1) as writer:
        await writer.write("x", key="busy")  # holds the only slot until 2.0
        with anyio.move_on_after(0.5):
            await writer.write_sync("gone", key="queued")  # due, waits for a slot
        stats = writer.statistics()
        assert (stats.withdrawn_items, stats.buffered) == (1, 1)
    assert sink.written() == ["x"]


async def test_teardown_while_a_retry_waits_for_a_slot() -> None:
    failure = OSError("down")
    sink = Sink(script=[failure], delays={"busy": 5.0})
    errors = Errors()
    with anyio.move_on_after(3):
        async with open_writer(
            sink,
            batch_size=1,
            concurrent_flushes=1,
            backoff=lambda retry: 1.0,
            on_error=errors,
        ) as writer:
            await writer.write("x", key="failing")  # fails at 0.0, retry at 1.0
            await writer.write("y", key="busy")  # takes the slot at 0.0 until 5.0
            await anyio.sleep_forever()
    # The retry of x waited for the slot from 1.0; the teardown at 3.0 ended it.
    assert errors.calls == [("failing", ["x"], failure)]
    assert anyio.current_time() == 5.0  # y's sink call finished
    assert sink.written() == ["x", "y"]
    assert writer.statistics().items_written == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
async def test_a_sink_raising_a_cancellation_of_its_own_is_a_failure() -> None:
    # (On trio a task cannot make a Cancelled of its own.)
    cancelled = asyncio.CancelledError

    async def sink(key: Any, items: list[Any]) -> None:
        raise cancelled()

    async with open_writer(sink) as writer:
        with pytest.raises(WriteError) as info:
            await writer.write_sync("a")
    assert isinstance(info.value.__cause__, cancelled)


async def test_close_timeout_drops_the_dependents_of_a_call_it_cuts_short() -> None:
    sink = Sink(delays={"hung": float("inf")})
    errors = Errors()
    async with open_writer(sink, close_timeout=1, on_error=errors) as writer:
        await writer.write("obj", key="hung", id="o1")
        await writer.write("ref", key="refs", after=["o1"])
    # ref is dropped first, then the call holding obj is cut short: always so.
    assert [items for _, items, _ in errors.calls] == [["ref"], ["obj"]]
    ref_error, obj_error = (exc for _, _, exc in errors.calls)
    assert isinstance(ref_error, keybatch.ProcessorStopped)
    assert isinstance(obj_error, WriteError)
    assert obj_error.may_have_landed
    stats = writer.statistics()
    assert (stats.dropped_items, stats.failed_items) == (1, 1)
    assert anyio.current_time() == 1.0
