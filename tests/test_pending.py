"""Pending: the handle submit returns, and each kind of outcome it delivers."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import keybatch

pytestmark = pytest.mark.trio


async def test_repr_and_done(autojump_clock: trio.abc.Clock) -> None:
    async with keybatch.open_processor() as processor:
        pending = processor.submit("k", lambda r: 1)
        assert repr(pending) == "<keybatch.Pending key='k' pending>"
        await pending.result()
        assert repr(pending) == "<keybatch.Pending key='k' done>"


async def test_operation_exception_is_that_object(
    autojump_clock: trio.abc.Clock,
) -> None:
    error = LookupError("mine")

    def op(resource: None) -> None:
        raise error

    async with keybatch.open_processor() as processor:
        pending = processor.submit("k", op)
        with pytest.raises(LookupError) as info:
            await pending.result()
        assert info.value is error


async def test_operation_returning_awaitable_fails_its_caller(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def not_an_op() -> None:  # pragma: no cover - closed, never run
        pass

    async with keybatch.open_processor() as processor:
        bad = processor.submit("k", lambda r: not_an_op())
        good = processor.submit("k", lambda r: "fine")
        with pytest.raises(TypeError, match="returned an awaitable"):
            await bad.result()
        assert await good.result() == "fine"
    # filterwarnings=error: a coroutine left unclosed would fail this test


async def test_load_and_save_errors_are_fresh_per_result_call(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def load(key: str) -> None:
        raise OSError("down")

    async with keybatch.open_processor(load=load) as processor:
        pending = processor.submit("k", lambda r: None)
        with pytest.raises(keybatch.LoadError) as first:
            await pending.result()
        with pytest.raises(keybatch.LoadError) as second:
            await pending.result()
        assert first.value is not second.value
        assert first.value.__cause__ is second.value.__cause__


async def test_submitted_during_teardown_gets_processor_stopped(
    autojump_clock: trio.abc.Clock,
) -> None:
    pending = None
    with trio.move_on_after(1):
        async with keybatch.open_processor(min_duration=100) as processor:
            pending = processor.submit("k", lambda r: None)
            await trio.sleep_forever()
    assert pending is not None
    assert pending.done()
    with pytest.raises(keybatch.ProcessorStopped, match="torn down"):
        await pending.result()
