"""Core bugs found by the chaos machine (tests/test_chaos.py), one minimal test each.

A new one is marked ``xfail(strict=True)`` while the core is broken: when a fix
lands the test passes, strict xfail turns that into a failure, and the fix
removes the mark. The test then stays here as the bug's regression test.
"""

from __future__ import annotations

import sys
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import keybatch
from keybatch import testing as kt

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup


@pytest.mark.anyio
async def test_exclusive_waits_for_a_call_waiting_for_room() -> None:
    order: list[str] = []

    def note(name: str) -> Any:
        def op(resource: None) -> None:
            order.append(name)

        return op

    async with keybatch.open_processor(min_duration=0.1, max_pending=1) as processor:
        processor.submit("a", note("first"))  # takes the only room
        async with anyio.create_task_group() as tg:
            tg.start_soon(processor.run, "a", note("waiting for room"))
            await anyio.wait_all_tasks_blocked()  # run() was called, waits for room
            async with processor.exclusive("a"):
                order.append("section")
    # The section was called after both operations: it must run after both.
    assert order == ["first", "waiting for room", "section"]


class Fatal(BaseException):
    """A BaseException from save: it kills the processor."""


@pytest.mark.anyio
async def test_a_save_killed_by_a_base_exception_keeps_its_close_reason() -> None:
    reports: list[keybatch.BatchReport] = []

    async def save(key: object, resource: object) -> None:
        await anyio.lowlevel.checkpoint()
        raise Fatal

    with pytest.raises(BaseException) as info:  # noqa: PT011 - Fatal, maybe grouped
        async with keybatch.open_processor(
            save=save, min_duration=0, on_batch=reports.append
        ) as processor:
            pending = processor.submit("k", lambda resource: None)
            await anyio.sleep_forever()
    assert isinstance(info.value, Fatal) or (
        isinstance(info.value, BaseExceptionGroup) and info.group_contains(Fatal)
    )
    with pytest.raises(keybatch.SaveError):
        await pending.result()
    [report] = reports
    assert isinstance(report.error, keybatch.SaveError)
    assert report.close_reason == "window"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
@pytest.mark.parametrize("moment", ["saving", "window open"])
async def test_native_cancel_of_the_workers_never_ends_the_block_silently(
    moment: str,
) -> None:
    import asyncio

    async def save(key: object, resource: object) -> None:
        await asyncio.sleep(0.05)

    outcome = "cut short, exited normally"
    try:
        async with keybatch.open_processor(
            save=save, min_duration=0.01, workers=1
        ) as processor:
            pending = processor.submit("k", lambda resource: None)
            await asyncio.sleep(0.02 if moment == "saving" else 0.001)
            for task in asyncio.all_tasks():
                if task.get_name().startswith("keybatch worker"):
                    task.cancel()
            await asyncio.sleep(1)
            outcome = "the block ran to its end"
    except BaseException:
        outcome = "raised"
    # Every call still gets its outcome (this part holds today).
    with pytest.raises((keybatch.SaveError, keybatch.ProcessorStopped)):
        await pending.result()
    assert outcome != "cut short, exited normally"


def _append(resource: list[int], x: int) -> int:
    resource.append(x)
    return len(resource)


@pytest.mark.anyio
@pytest.mark.parametrize("ending", ["owner cancelled", "reload raises Fatal"])
async def test_teardown_during_a_replays_reload_gives_every_caller_an_outcome(
    ending: str,
) -> None:
    store = kt.memory_store(lambda key: [], versioned=True)
    # The save finds that another writer saved first (Conflict): the batch
    # loads again to replay, and that reload is where the processor ends.
    store.inject("save", nth=1, external=lambda resource: [*resource, 100])
    with anyio.CancelScope() as scope:
        if ending == "owner cancelled":
            store.inject("load", nth=2, cancel=scope)
        else:
            store.inject("load", nth=2, error=Fatal)
        try:
            async with keybatch.open_processor(
                load=store.load, save=store.save, min_duration=0.01
            ) as processor:
                pending = processor.submit("k", _append, 1)
                await anyio.sleep_forever()
        except Fatal:
            assert ending == "reload raises Fatal"
    assert processor.statistics().pending_operations == 0
    assert pending.done()
    with pytest.raises(keybatch.KeybatchError):  # SaveError, say: not stored
        await pending.result()
