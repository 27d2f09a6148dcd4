"""Regression tests for the faults listed in issue 8 (core v2), one or more each.

Each test failed on keybatch 0.1. They run on every backend (tests/conftest.py)
unless the fault is backend-specific.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import gc
import logging
import pickle
import threading
import typing
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import trio
import trio.lowlevel
import trio.testing

import keybatch
import keybatch.loader
import keybatch.testing
import keybatch.writer


def append(resource: list[Any], value: Any) -> int:
    resource.append(value)
    return len(resource)


def boom(resource: Any) -> None:
    raise ValueError("op failed")


class Store:
    """An in-memory store of lists, with optional slow loads."""

    def __init__(self, load_delay: float = 0.0) -> None:
        self.data: dict[Any, list[Any]] = {}
        self.load_delay = load_delay
        self.saves = 0

    async def load(self, key: Any) -> list[Any]:
        if self.load_delay:
            await anyio.sleep(self.load_delay)
        return list(self.data.get(key, []))

    async def save(self, key: Any, value: list[Any]) -> None:
        self.saves += 1
        self.data[key] = value


# -- fault 1: teardown while callers wait for room ------------------------------


@pytest.mark.trio
async def test_fault1_owner_cancelled_while_callers_wait_for_room_trio(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The reproduction from the issue, verbatim.
    store = Store(load_delay=0.2)
    outcomes: dict[str, Any] = {}

    async def call(name: str, key: str) -> None:
        try:
            outcomes[name] = await processor.run(key, append, name)
        except BaseException as exc:
            outcomes[name] = type(exc)
            if isinstance(exc, trio.Cancelled):
                raise

    async with trio.open_nursery() as outer:
        with trio.CancelScope() as scope:
            async with keybatch.open_processor(
                load=store.load,
                save=store.save,
                workers=3,
                max_pending=1,
                min_duration=0.5,
                max_duration=0.8,
            ) as processor:
                pending = processor.submit("gamma", append, "first")
                outer.start_soon(call, "alpha", "alpha")
                outer.start_soon(call, "gamma", "gamma")
                await trio.lowlevel.checkpoint()
                scope.cancel()
                await trio.lowlevel.checkpoint()
    assert outcomes == {
        "alpha": keybatch.ProcessorStopped,
        "gamma": keybatch.ProcessorStopped,
    }
    with pytest.raises(keybatch.ProcessorStopped):
        await pending.result()
    stats = processor.statistics()
    assert (stats.keys, stats.pending_operations, stats.active_batches) == (0, 0, 0)


@pytest.mark.anyio
@pytest.mark.parametrize("when", [0.0, 0.1, 0.3, 0.55, 0.6, 0.7])
async def test_fault1_every_call_gets_one_outcome_whenever_the_owner_is_cancelled(
    when: float,
) -> None:
    # Cancel the owner at moments: waiting for room, loading, window open, saving.
    store = Store(load_delay=0.2)

    async def slow_save(key: Any, value: list[Any]) -> None:
        await anyio.sleep(0.1)
        await store.save(key, value)

    outcomes: dict[int, Any] = {}

    async def call(i: int) -> None:
        try:
            outcomes[i] = await processor.run(f"k{i % 3}", append, i)
        except Exception as exc:
            outcomes[i] = type(exc)

    async with anyio.create_task_group() as outer:
        with anyio.CancelScope() as scope:
            async with keybatch.open_processor(
                load=store.load,
                save=slow_save,
                workers=2,
                max_pending=3,
                min_duration=0.5,
                max_duration=1.0,
            ) as processor:
                for i in range(8):
                    outer.start_soon(call, i)
                await anyio.sleep(when)
                scope.cancel()
                await anyio.lowlevel.checkpoint()
    assert sorted(outcomes) == list(range(8))
    saved = [v for values in store.data.values() for v in values]
    for i, outcome in outcomes.items():
        if isinstance(outcome, int):
            assert i in saved
        else:
            assert outcome is keybatch.ProcessorStopped
            assert i not in saved
    stats = processor.statistics()
    assert (stats.keys, stats.pending_operations, stats.active_batches) == (0, 0, 0)


# -- fault 2: call order under backpressure -------------------------------------


@pytest.mark.anyio
async def test_fault2_waiters_for_room_are_admitted_in_call_order() -> None:
    store = Store()
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=0.1, max_pending=2
    ) as processor:
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(processor.run, "k", append, i)
                await anyio.wait_all_tasks_blocked()  # started in order
    assert store.data["k"] == list(range(8))


@pytest.mark.anyio
async def test_fault2_submit_never_overtakes_a_waiter() -> None:
    store = Store()
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=0.1, max_pending=1
    ) as processor:
        first = processor.submit("k", append, "first")
        async with anyio.create_task_group() as tg:
            tg.start_soon(processor.run, "k", append, "waiter")
            await anyio.wait_all_tasks_blocked()
            assert processor.statistics().pending_operations == 1
            with pytest.raises(keybatch.Overloaded, match="wait for room"):
                processor.submit("k", append, "newcomer")
        await first.result()
    assert store.data["k"] == ["first", "waiter"]


@pytest.mark.anyio
async def test_fault2_a_cancelled_waiter_passes_its_turn_on() -> None:
    store = Store()
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=0.1, max_pending=1
    ) as processor:
        processor.submit("k", append, 0)
        doomed_scope = anyio.CancelScope()

        async def doomed() -> None:
            with doomed_scope:
                await processor.run("k", append, "doomed")

        async with anyio.create_task_group() as tg:
            tg.start_soon(processor.run, "k", append, 1)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(doomed)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(processor.run, "k", append, 2)
            await anyio.wait_all_tasks_blocked()
            doomed_scope.cancel()
    assert store.data["k"] == [0, 1, 2]
    assert processor.statistics().pending_operations == 0


# -- fault 3: no cyclic garbage --------------------------------------------------


@pytest.fixture
def no_gc() -> Any:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.anyio
@pytest.mark.timeless
@pytest.mark.parametrize("how", ["run", "submit"])
async def test_fault3_raising_operations_leave_no_cycles(how: str, no_gc: Any) -> None:
    async with keybatch.open_processor(min_duration=0) as processor:
        await processor.run("warm", lambda r: None)
        gc.collect()
        for _ in range(200):
            try:
                if how == "run":
                    await processor.run("k", boom)
                else:
                    await processor.submit("k", boom).result()
            except ValueError:
                pass
        assert gc.collect() == 0


@pytest.mark.anyio
@pytest.mark.timeless
@pytest.mark.parametrize("fail", ["load", "save"])
async def test_fault3_failed_batches_leave_no_cycles(fail: str, no_gc: Any) -> None:
    async def load(key: Any) -> list[Any]:
        if fail == "load":
            raise OSError("load down")
        return []

    async def save(key: Any, value: Any) -> None:
        if fail == "save":
            raise OSError("save down")

    async with keybatch.open_processor(
        load=load, save=save, min_duration=0
    ) as processor:
        gc.collect()
        for _ in range(100):
            with pytest.raises(keybatch.BatchError):
                await processor.run("k", append, 1)
        assert gc.collect() == 0


# -- fault 4: pickle and copy ----------------------------------------------------


def _exceptions() -> list[BaseException]:
    return [
        keybatch.LoadError("k", "load of key 'k' failed"),
        keybatch.SaveError("k", "save failed", may_have_landed=False),
        keybatch.SaveError(b"k", "save failed"),
        keybatch.BatchError(("t", 1), "failed"),
        keybatch.KeyBusy(["a", "b"]),
        keybatch.Conflict("version moved"),
        keybatch.ProcessorStopped("stopping"),
        keybatch.Overloaded("full"),
        keybatch.KeybatchError("base"),
    ]


@pytest.mark.parametrize("exc", _exceptions(), ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("how", ["pickle", "copy", "deepcopy"])
def test_fault4_exceptions_round_trip(exc: BaseException, how: str) -> None:
    if how == "pickle":
        clone = pickle.loads(pickle.dumps(exc))
    elif how == "copy":
        clone = copy.copy(exc)
    else:
        clone = copy.deepcopy(exc)
    assert type(clone) is type(exc)
    assert str(clone) == str(exc)
    assert clone.__dict__ == exc.__dict__
    for attr in ("key", "keys", "may_have_landed"):
        assert getattr(clone, attr, None) == getattr(exc, attr, None)


# -- fault 5: get_type_hints after the __module__ rewrite ------------------------


def _public_classes() -> list[type]:
    found = []
    for module in (keybatch, keybatch.writer, keybatch.loader, keybatch.testing):
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, type):
                found.append(obj)
    return found


@pytest.mark.parametrize("cls", _public_classes(), ids=lambda c: c.__qualname__)
def test_fault5_type_hints_resolve_on_every_public_class(cls: type) -> None:
    typing.get_type_hints(cls)


def test_fault5_public_names_say_where_they_live() -> None:
    assert keybatch.Processor.__module__ == "keybatch"
    assert keybatch.SaveError.__module__ == "keybatch"
    assert typing.get_type_hints(keybatch.BatchReport)["close_reason"] == (str | None)


# -- fault 6: contextvars --------------------------------------------------------

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


@pytest.mark.anyio
async def test_fault6_each_op_runs_in_a_copy_of_its_callers_context() -> None:
    seen: dict[str, Any] = {}

    def op(resource: Any, name: str) -> str:
        seen[name] = request_id.get("unset")
        request_id.set("changed by op")
        return name

    async def load(key: Any) -> None:
        seen["load"] = request_id.get("unset")

    async def save(key: Any, value: Any) -> None:
        seen["save"] = request_id.get("unset")

    def hook(report: keybatch.BatchReport) -> None:
        seen["hook"] = request_id.get("unset")

    async def caller(name: str) -> None:
        request_id.set(name)
        await processor.run("k", op, name)
        seen[f"{name} after"] = request_id.get()

    request_id.set("opener")
    async with keybatch.open_processor(
        load=load, save=save, on_batch=hook, min_duration=0.1
    ) as processor:
        request_id.set("body")
        async with anyio.create_task_group() as tg:
            tg.start_soon(caller, "a")
            tg.start_soon(caller, "b")
    assert seen == {
        "a": "a",
        "b": "b",
        "a after": "a",
        "b after": "b",
        "load": "opener",
        "save": "opener",
        "hook": "opener",
    }


# -- fault 7: a BaseException kills a worker -------------------------------------


class Fatal(BaseException):
    pass


@pytest.mark.anyio
async def test_fault7_calls_in_the_same_round_as_a_fatal_load_get_an_outcome() -> None:
    async def load(key: Any) -> list[Any]:
        if key == "fatal":
            raise Fatal
        return []

    outcomes: list[Any] = []

    async def call(key: str) -> None:
        try:
            outcomes.append(await processor.run(key, append, key))
        except Exception as exc:
            outcomes.append(type(exc))

    with pytest.raises(Fatal):
        async with keybatch.open_processor(
            load=load, workers=1, min_duration=0.1
        ) as processor:
            async with anyio.create_task_group() as callers:
                processor.submit("fatal", append, 1)
                for key in ("a", "b", "c"):
                    callers.start_soon(call, key)
                await anyio.sleep(0.05)
                # the load has raised by now; a call now is refused at once
                with pytest.raises(keybatch.ProcessorStopped):
                    processor.submit("late", append, 1)
                await anyio.sleep(1)
    assert outcomes == [keybatch.ProcessorStopped] * 3
    stats = processor.statistics()
    assert (stats.keys, stats.pending_operations) == (0, 0)


@pytest.mark.anyio
async def test_fault7_fatal_hook_stops_the_processor_cleanly() -> None:
    def hook(report: keybatch.BatchReport) -> None:
        raise Fatal

    store = Store()
    results: list[Any] = []
    with pytest.raises(Fatal):
        async with keybatch.open_processor(
            load=store.load, save=store.save, on_batch=hook, min_duration=0.1
        ) as processor:

            async def call(i: int) -> None:
                try:
                    results.append(await processor.run("k", append, i))
                except Exception as exc:
                    results.append(type(exc))

            async with anyio.create_task_group() as callers:
                callers.start_soon(call, 1)
                await anyio.sleep(0.2)
                callers.start_soon(call, 2)
                await anyio.sleep(1)
    # the first batch was saved before the hook ran; the body (and the second
    # caller in it) was cancelled when the worker died
    assert results == [1]
    stats = processor.statistics()
    assert (stats.keys, stats.pending_operations, stats.stopping) == (0, 0, True)
    assert store.data == {"k": [1]}


# -- fault 8: a CancelledError that is not aimed at the worker (asyncio) ---------

from keybatch._backends._asyncio import PUBLIC_ONLY  # noqa: E402

needs_cancelling = pytest.mark.skipif(
    PUBLIC_ONLY, reason="the public-API fallback cannot tell (documented)"
)


@needs_cancelling
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
@pytest.mark.parametrize("where", ["load", "save"])
async def test_fault8_foreign_cancelled_error_is_a_failure(where: str) -> None:
    async def cancelled_elsewhere() -> None:
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future  # raises CancelledError; nobody cancelled this task

    async def load(key: Any) -> list[Any]:
        if where == "load":
            await cancelled_elsewhere()
        return []

    async def save(key: Any, value: Any) -> None:
        if where == "save":
            await cancelled_elsewhere()

    expected = keybatch.LoadError if where == "load" else keybatch.SaveError
    async with keybatch.open_processor(
        load=load, save=save, min_duration=0.1
    ) as processor:
        with pytest.raises(expected) as info:
            await processor.run("k", append, 1)
        assert isinstance(info.value.__cause__, asyncio.CancelledError)
        # the worker survived
        assert processor.statistics().pending_operations == 0
    stats = processor.statistics()
    failures = stats.load_failures if where == "load" else stats.save_failures
    assert failures == 1


@needs_cancelling
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
async def test_fault8_foreign_cancelled_error_in_a_hook_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def hook(report: keybatch.BatchReport) -> None:
        raise asyncio.CancelledError

    with caplog.at_level(logging.WARNING, logger="keybatch"):
        async with keybatch.open_processor(
            on_batch=hook, min_duration=0.1
        ) as processor:
            assert await processor.run("k", lambda r: 7) == 7
            assert await processor.run("k", lambda r: 8) == 8
    assert "not aimed at its worker" in caplog.text


@pytest.mark.skipif(not PUBLIC_ONLY, reason="the fallback's documented behaviour")
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
async def test_fault8_fallback_treats_it_as_the_workers_own_and_stops() -> None:
    async def load(key: Any) -> list[Any]:
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future
        return []

    async with keybatch.open_processor(load=load, min_duration=0.1) as processor:
        with pytest.raises(keybatch.ProcessorStopped):
            await processor.run("k", append, 1)
        assert processor.statistics().stopping is True
    assert processor.statistics().pending_operations == 0


# -- fault 9: aclose from another thread -----------------------------------------


@pytest.mark.anyio
async def test_fault9_aclose_from_another_thread_changes_nothing() -> None:
    errors: list[BaseException] = []
    async with keybatch.open_processor(min_duration=0) as processor:

        def other() -> None:
            try:
                asyncio.run(processor.aclose())
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert len(errors) == 1
        assert isinstance(errors[0], RuntimeError)
        assert processor.statistics().stopping is False
        assert await processor.run("k", lambda r: 5) == 5


# -- fault 10: native cancellation of the worker tasks (asyncio) -----------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
async def test_fault10_native_cancel_of_workers_still_resolves_every_pending() -> None:
    saving = anyio.Event()

    async def save(key: Any, value: Any) -> None:
        saving.set()
        await anyio.sleep(1)

    async with keybatch.open_processor(save=save, min_duration=0.1) as processor:
        pendings = [processor.submit("k", lambda r, i: i, i) for i in range(3)]
        await saving.wait()
        later = processor.submit("other", append, 1)
        me = asyncio.current_task()
        for task in asyncio.all_tasks():
            if task is not me and "keybatch worker" in task.get_name():
                task.cancel()
        for pending in pendings:
            with pytest.raises(keybatch.SaveError) as info:
                await pending.result()
            assert info.value.may_have_landed is True
        with pytest.raises(keybatch.ProcessorStopped):
            await later.result()
        with pytest.raises(keybatch.ProcessorStopped):
            await processor.run("k", append, 9)
    stats = processor.statistics()
    assert (stats.keys, stats.pending_operations, stats.active_batches) == (0, 0, 0)


# -- fault 11: one caller's cancellation does not wake the others (asyncio) ------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
@pytest.mark.parametrize("callers", [200, 1000])
async def test_fault11_cancelled_callers_wake_the_batch_at_most_once(
    callers: int,
) -> None:
    # Count how often the batch's other callers are woken: each re-park creates
    # a future. With one shared future per batch, each of the 50 cancellations
    # below would wake all the other callers, who re-park (10,000+ futures).
    loop = asyncio.get_running_loop()
    created = 0
    original = loop.create_future

    def counting() -> asyncio.Future[Any]:
        nonlocal created
        created += 1
        return original()

    async with keybatch.open_processor(min_duration=1.0) as processor:
        async with anyio.create_task_group() as tg:
            scopes = []
            for i in range(callers):
                scope = anyio.CancelScope()
                scopes.append(scope)

                async def call(scope: anyio.CancelScope = scope, i: int = i) -> None:
                    with scope:
                        await processor.run("k", lambda r, i: i, i)

                tg.start_soon(call)
            await anyio.sleep(0.1)
            loop.create_future = counting  # type: ignore[method-assign]
            for scope in scopes[:50]:
                scope.cancel()
                await anyio.sleep(0.001)
            await anyio.lowlevel.checkpoint()
            loop.create_future = original  # type: ignore[method-assign]
    # Each caller waits on a future of its own: a cancellation wakes nobody
    # else, so nobody re-parks (the 50 sleeps of this loop make one future
    # each), whatever the batch's size.
    assert created <= 50 * 2
    assert processor.statistics().operations_withdrawn == 50


# -- the asyncio path does not import trio ---------------------------------------


def test_the_asyncio_path_does_not_import_trio() -> None:
    import subprocess
    import sys

    code = (
        "import asyncio, sys, keybatch\n"
        "async def batch_load(ids):\n"
        "    return {i: i for i in ids}\n"
        "async def main():\n"
        "    async with keybatch.open_processor(min_duration=0) as p:\n"
        "        assert await p.run('k', lambda r: 1) == 1\n"
        "    async with keybatch.open_loader(batch_load) as loader:\n"
        "        assert await loader.load(3) == 3\n"
        "asyncio.run(main())\n"
        "assert 'trio' not in sys.modules, 'trio was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
