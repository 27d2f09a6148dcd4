"""docs/semantics.md, point 11 (teardown: the block raises or is cancelled):
workers are cancelled; operations not applied yet fail with ProcessorStopped;
saves in progress are shielded from the cancellation and finish, bounded by
their deadline. The block's own exception comes out as it went in."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import keybatch

from ..helpers import Harness, append, list_store, now, opener, outcome_of, settle

pytestmark = pytest.mark.anyio


class _Boom(Exception):
    pass


@pytest.mark.parametrize("how", ["cancelled", "raises"])
async def test_teardown_fails_unapplied_operations_and_finishes_saves(how: str) -> None:
    h = Harness()
    h.store.inject("save", keys="a", latency=1.0)
    ended = False
    async with anyio.create_task_group() as callers:
        with anyio.move_on_after(0.5) if how == "cancelled" else pytest.raises(_Boom):
            async with h.open(
                workers=1, min_duration=0.25, max_duration=5
            ) as processor:
                callers.start_soon(h.call, processor, 0, "a", append, 1)
                await anyio.sleep(0.375)  # "a" applied at 0.25, saving until 1.25
                callers.start_soon(h.call, processor, 1, "a", append, 2)  # queued
                saved = h.rec.submit(processor, "b", append, 3)  # window open
                lost = h.rec.submit(processor, "a", append, 4)  # queued
                await anyio.sleep(0.0625)
                if how == "raises":
                    raise _Boom
                await anyio.sleep_forever()
            ended = True
        assert not ended
        # the shielded save finished before the processor's block exited
        assert now() == 1.25
    assert h.store.data == {"a": [1]}
    assert h.results[0] == 1
    assert isinstance(h.results[1], keybatch.ProcessorStopped)
    for pending in (saved, lost):
        assert pending.done()
        with pytest.raises(keybatch.ProcessorStopped, match="torn down"):
            await h.rec.result(pending)
    stats = processor.statistics()
    assert (stats.keys, stats.pending_operations, stats.active_batches) == (0, 0, 0)
    assert stats.stopping
    with pytest.raises(keybatch.ProcessorStopped):
        processor.submit("a", append, 5)
    await h.check()


@pytest.mark.parametrize(
    "exc", [KeyError("mine"), _Boom("x"), KeyboardInterrupt()], ids=repr
)
async def test_the_blocks_own_exception_is_not_wrapped(exc: BaseException) -> None:
    context = ValueError("context")
    with pytest.raises(type(exc)) as info:
        async with keybatch.open_processor() as processor:
            processor.submit("k", append, 1)
            try:
                raise context
            except ValueError:
                raise exc  # noqa: B904 - the implicit context is the point
    assert info.value is exc
    assert info.value.__context__ is context
    assert processor.statistics().pending_operations == 0


class Fatal(BaseException):
    """A BaseException that asyncio lets a task raise like any other (it
    re-raises KeyboardInterrupt and SystemExit out of the event loop itself)."""


async def _fatal_save(make: Any, during: str) -> None:
    # A BaseException from load/save is not swallowed: the workers it hits stop,
    # the processor is torn down, and it propagates out of the `async with` (in
    # an exception group, as from any task group). Callers still get outcomes.
    store = list_store()
    store.inject("save", keys="fatal", error=make)
    outcomes: dict[str, Any] = {}

    async def call(key: str) -> None:
        outcomes[key] = await outcome_of(lambda: processor.run(key, append, 1))

    kind = type(make())
    with pytest.RaisesGroup(kind, allow_unwrapped=True, flatten_subgroups=True):
        async with anyio.create_task_group() as tg:
            async with opener(
                store, workers=1, worker_for_key=lambda key, n: 0
            ) as processor:
                tg.start_soon(call, "fatal")
                if during == "running":
                    await anyio.sleep(0.05)
                tg.start_soon(call, "other")
                await settle()  # both calls accepted
                if during == "running":
                    await anyio.sleep_forever()
    assert isinstance(outcomes["fatal"], keybatch.SaveError)
    assert isinstance(outcomes["fatal"].__cause__, kind)
    assert outcomes["fatal"].may_have_landed is True
    if during == "running":
        # queued behind "fatal" on the one worker (its window closes later):
        # never applied
        assert isinstance(outcomes["other"], keybatch.ProcessorStopped)
    else:
        # the stop closed both windows: no order between the keys
        assert outcomes["other"] == 1 or isinstance(
            outcomes["other"], keybatch.ProcessorStopped
        )
    stats = processor.statistics()
    assert (stats.keys, stats.pending_operations, stats.active_batches) == (0, 0, 0)
    assert "fatal" not in store.data


@pytest.mark.parametrize("during", ["running", "the stop"])
async def test_a_base_exception_from_save_tears_the_processor_down(during: str) -> None:
    await _fatal_save(Fatal, during)


@pytest.mark.parametrize("anyio_backend", ["trio"], indirect=True)
@pytest.mark.parametrize("during", ["running", "the stop"])
@pytest.mark.parametrize(
    "make", [lambda: SystemExit(3), KeyboardInterrupt], ids=["SystemExit", "KI"]
)
async def test_system_exit_or_keyboard_interrupt_from_save_on_trio(
    make: Any, during: str
) -> None:
    """On asyncio these two leave the event loop itself (asyncio's own rule for
    any task), so they are checked on trio."""
    await _fatal_save(make, during)


async def _fatal_hook(kind: type[BaseException]) -> None:
    def hook(report: keybatch.BatchReport) -> None:
        raise kind

    store = list_store()
    with pytest.RaisesGroup(kind, allow_unwrapped=True, flatten_subgroups=True):
        async with opener(store, on_batch=hook) as processor:
            pending = processor.submit("a", append, 1)
            await anyio.sleep_forever()
    assert now() == 0.1
    assert await pending.result() == 1  # the batch was saved before the hook ran
    assert store.data == {"a": [1]}
    assert processor.statistics().keys == 0


async def test_a_hook_raising_a_base_exception_tears_the_processor_down() -> None:
    await _fatal_hook(Fatal)


@pytest.mark.parametrize("anyio_backend", ["trio"], indirect=True)
async def test_a_hook_raising_keyboard_interrupt_on_trio() -> None:
    await _fatal_hook(KeyboardInterrupt)
