"""docs/semantics.md, point 16 (one event loop): a processor is used from the
thread of the event loop that opened it; calls from another thread raise
RuntimeError (use `from_thread.run`), and so do calls from another event loop
in the same thread. Every async method is a checkpoint, even when it need not
wait."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest
import trio

import keybatch
from keybatch._backends._asyncio import PUBLIC_ONLY

from ..helpers import append, cancelled_exc, list_store, opener, still_works

pytestmark = pytest.mark.anyio


async def test_calls_from_another_thread_raise_runtime_error() -> None:
    store = list_store()
    async with opener(store) as processor:
        errors: list[BaseException] = []

        def in_thread() -> None:
            calls = [
                lambda: processor.submit("a", append, 1),
                lambda: asyncio.run(processor.run("a", append, 1)),
                lambda: asyncio.run(processor.flush()),
                lambda: asyncio.run(processor.aclose()),
            ]
            for call in calls:
                try:
                    call()
                except BaseException as exc:
                    errors.append(exc)

        await anyio.to_thread.run_sync(in_thread)
        assert [type(e) for e in errors] == [RuntimeError] * 4
        assert all("thread" in str(e) for e in errors)
        stats = processor.statistics()
        assert not stats.stopping, "a refused aclose changed nothing"
        assert stats.pending_operations == 0
        # The sanctioned way from a thread:
        value = await anyio.to_thread.run_sync(
            lambda: anyio.from_thread.run(processor.run, "a", append, 2)
        )
        assert value == 1
        await still_works(processor, "a")
    assert store.data == {"a": [2, "ok"], "bystander": ["ok"]}


@pytest.mark.parametrize("anyio_backend", ["trio"], indirect=True)
async def test_calls_from_an_asyncio_loop_inside_trio_raise_runtime_error() -> None:
    # asyncio.run() called from a trio task (same thread, another event loop).
    store = list_store()
    async with opener(store) as processor:
        with pytest.raises(RuntimeError, match="event loop that opened it"):
            asyncio.run(processor.run("a", append, 1))
        pending = processor.submit("a", append, 1)  # submit does not wait: fine
        with pytest.raises(RuntimeError, match="event loop that opened it"):
            asyncio.run(pending.result())  # type: ignore[arg-type]
        assert await pending.result() == 1
        await still_works(processor, "a")
    assert store.data == {"a": [1, "ok"], "bystander": ["ok"]}


# With the public-API fallback of the asyncio backend (always on Python 3.10,
# or forced by KEYBATCH_ASYNCIO_PUBLIC_ONLY=1), every caller parks on a future
# of its own, so nothing shared can be corrupted: the caller gets trio's own
# TypeError.
if not PUBLIC_ONLY:
    FOREIGN_LOOP_ERROR: type[Exception] = RuntimeError
    FOREIGN_LOOP_MESSAGE = "event loop that opened it"
else:  # pragma: no cover - the fallback's CI run
    FOREIGN_LOOP_ERROR = TypeError
    FOREIGN_LOOP_MESSAGE = "other framework like asyncio"


@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
async def test_calls_from_trio_inside_asyncio_raise_and_spare_the_batch() -> None:
    # trio.run() called from an asyncio task: the asyncio processor's callers
    # that share the batch must not be broken by it.
    store = list_store()
    async with opener(store, min_duration=0.01) as processor:
        honest = asyncio.ensure_future(processor.run("a", append, 1))
        await asyncio.sleep(0)
        with pytest.raises(FOREIGN_LOOP_ERROR, match=FOREIGN_LOOP_MESSAGE):
            trio.run(processor.run, "a", append, 2)
        pending = processor.submit("a", append, 3)
        with pytest.raises(FOREIGN_LOOP_ERROR, match=FOREIGN_LOOP_MESSAGE):
            trio.run(pending.result)
        # A caller joining the same batch afterwards is not affected.
        late = asyncio.ensure_future(processor.run("a", append, 4))
        await asyncio.sleep(0)
        assert [await honest, await pending.result(), await late] == [1, 2, 3]
        await still_works(processor, "a")
    assert store.data == {"a": [1, 3, 4, "ok"], "bystander": ["ok"]}


def test_a_processor_used_by_a_later_event_loop_is_stopped(
    anyio_backend: tuple[str, dict[str, Any]],
) -> None:
    name, options = anyio_backend
    store = list_store()
    leaked: list[keybatch.Processor[Any]] = []

    async def first() -> None:
        async with opener(store, min_duration=0) as processor:
            leaked.append(processor)
            await processor.run("a", append, 1)

    async def second() -> None:
        with pytest.raises(keybatch.ProcessorStopped):
            await leaked[0].run("a", append, 2)
        with pytest.raises(keybatch.ProcessorStopped):
            leaked[0].submit("a", append, 2)

    anyio.run(first, backend=name, backend_options=options)
    anyio.run(second, backend=name, backend_options=options)
    assert store.data == {"a": [1]}


@pytest.mark.parametrize("call", ["run", "result of a done Pending", "flush", "aclose"])
async def test_every_async_method_is_a_checkpoint(call: str, backend_name: str) -> None:
    async with keybatch.open_processor(min_duration=0.1) as processor:
        done = processor.submit("k", lambda r: 1)
        assert await done.result() == 1
        if call == "aclose":
            await processor.aclose()  # stopped: the next one need not wait
        with anyio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(cancelled_exc()):
                if call == "run":
                    await processor.run("k", lambda r: 2)
                elif call == "flush":
                    await processor.flush()
                elif call == "aclose":
                    await processor.aclose()
                else:
                    await done.result()
        stats = processor.statistics()
        assert (stats.operations_done, stats.pending_operations) == (1, 0)
        # run() in a cancelled scope: refused before it accepts on trio; on
        # asyncio an anyio scope's cancellation not yet delivered is seen at
        # its first wait (accepted, then withdrawn)
        accepted = call == "run" and backend_name != "trio"
        assert stats.operations_withdrawn == (1 if accepted else 0)
