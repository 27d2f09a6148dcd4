"""Hostile and bad input: a clear, typed error where the mistake is made, and a
processor that keeps working for everyone else afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import threading
from typing import Any

import pytest
import trio
import trio.testing

import keybatch
from keybatch import testing as kt


def append(resource: list[Any], x: Any) -> int:
    resource.append(x)
    return len(resource)


def opener(store: kt.MemoryStore[Any], **options: Any) -> Any:
    options.setdefault("min_duration", 0.1)
    options.setdefault("workers", 4)
    return keybatch.open_processor(load=store.load, save=store.save, **options)


async def still_works(
    processor: keybatch.Processor[Any], *keys: Any, rec: kt.Recorder | None = None
) -> None:
    """Every given key (and a fresh one) still gets batches applied and saved."""
    for key in (*keys, "bystander"):
        before = processor.statistics()
        if rec is None:
            assert await processor.run(key, append, "ok") >= 1
        else:
            assert await rec.run(processor, key, append, "ok") >= 1
        after = processor.statistics()
        assert after.operations_done == before.operations_done + 1
    assert processor.statistics().pending_operations == 0


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize("key", [42, 4.2, None, ("a",), frozenset(), b"x"[0]])
@pytest.mark.trio
async def test_key_of_the_wrong_type_is_a_type_error_at_the_call(
    key: Any, autojump_clock: Any
) -> None:
    store = kt.memory_store(lambda key: [])
    async with opener(store) as processor:
        with pytest.raises(TypeError, match="keys must be str or bytes"):
            await processor.run(key, append, 1)
        with pytest.raises(TypeError, match="keys must be str or bytes"):
            processor.submit(key, append, 1)
        assert processor.statistics().keys == 0  # nothing was left behind
        await still_works(processor, "a")
    assert store.loads == store.saves == 2


@pytest.mark.trio
async def test_other_key_types_work_with_a_custom_router(autojump_clock: Any) -> None:
    store = kt.memory_store(lambda key: [])
    async with opener(store, worker_for_key=lambda key, n: hash(key) % n) as processor:
        assert await processor.run(42, append, 1) == 1
        assert await processor.run(("a", 1), append, 1) == 1
    assert store.data == {42: [1], ("a", 1): [1]}


@pytest.mark.trio
async def test_a_router_returning_nonsense_is_a_value_error(
    autojump_clock: Any,
) -> None:
    store = kt.memory_store(lambda key: [])
    async with opener(store, worker_for_key=lambda key, n: n if key == "x" else 0) as p:
        with pytest.raises(ValueError, match="expected an int in range"):
            await p.run("x", append, 1)
        await still_works(p, "a")


@pytest.mark.parametrize("key", ["", b""])
@pytest.mark.trio
async def test_empty_keys_are_keys(key: str | bytes, autojump_clock: Any) -> None:
    store = kt.memory_store(lambda key: [])
    async with opener(store) as processor:
        assert await processor.run(key, append, 1) == 1
        assert await processor.run(key, append, 2) == 2
    assert store.data == {key: [1, 2]}


@pytest.mark.parametrize("kind", [str, bytes])
@pytest.mark.trio
async def test_one_megabyte_keys(kind: type, autojump_clock: Any) -> None:
    big = "k" * 2**20 if kind is str else b"k" * 2**20
    store = kt.memory_store(lambda key: [])
    async with opener(store) as processor:
        with kt.assert_elapsed(0.1):
            assert await processor.run(big, append, 1) == 1
        assert await processor.run(big + big[:1], append, 1) == 1  # another key
        await still_works(processor, big)
    assert store.data[big] == [1, "ok"]
    assert keybatch.worker_for_key(big, 7) == keybatch.worker_for_key(big, 7)


@pytest.mark.parametrize(
    "key", ["\ud800", "ok\udfff", "a\ud83d", "\udc80" * 1000], ids=repr
)
@pytest.mark.trio
async def test_str_keys_not_utf8_encodable_are_a_value_error(
    key: str, autojump_clock: Any
) -> None:
    # mmh3 5.x crashes the interpreter on a str holding a lone surrogate: the
    # router must encode first. Reaching the assertions at all is half the test.
    with pytest.raises(ValueError, match="not UTF-8 encodable"):
        keybatch.worker_for_key(key, 8)
    store = kt.memory_store(lambda key: [])
    async with opener(store) as processor:
        with pytest.raises(ValueError, match="not UTF-8 encodable") as info:
            await processor.run(key, append, 1)
        assert isinstance(info.value.__cause__, UnicodeEncodeError)
        with pytest.raises(ValueError, match="not UTF-8 encodable"):
            processor.submit(key, append, 1)
        assert processor.statistics().keys == 0
        await still_works(processor, "a")


@pytest.mark.trio
async def test_str_subclass_key_with_a_surrogate(autojump_clock: Any) -> None:
    class Key(str):
        pass

    store = kt.memory_store(lambda key: [])
    async with opener(store) as processor:
        with pytest.raises(ValueError, match="not UTF-8 encodable"):
            await processor.run(Key("\ud800"), append, 1)
        assert await processor.run(Key("fine"), append, 1) == 1
        await still_works(processor, "fine")


# --------------------------------------------------------------------------- ops


async def _async_op(resource: list[Any]) -> None:
    raise AssertionError("never runs")


class _AsyncCallable:
    async def __call__(self, resource: list[Any]) -> None:
        raise AssertionError("never runs")


@pytest.mark.parametrize(
    "op",
    [_async_op, functools.partial(_async_op), _AsyncCallable()],
    ids=["async def", "partial", "async __call__"],
)
@pytest.mark.trio
async def test_async_function_as_op_is_a_type_error_at_the_call(
    op: Any, autojump_clock: Any
) -> None:
    store = kt.memory_store(lambda key: [])
    async with opener(store) as processor:
        with pytest.raises(TypeError, match="plain function"):
            await processor.run("a", op)
        with pytest.raises(TypeError, match="plain function"):
            processor.submit("a", op)
        assert processor.statistics().pending_operations == 0
        await still_works(processor, "a")


@pytest.mark.trio
async def test_not_callable_op_is_a_type_error(autojump_clock: Any) -> None:
    store = kt.memory_store(lambda key: [])
    async with opener(store) as processor:
        with pytest.raises(TypeError, match="callable"):
            await processor.run("a", 42)  # type: ignore[arg-type]
        await still_works(processor, "a")


class _Awaitable:
    def __await__(self) -> Any:
        yield from ()


@pytest.mark.parametrize(
    "make",
    [lambda: _async_op([]), _Awaitable, lambda: asyncio.sleep(0)],
    ids=["coroutine", "__await__", "asyncio.sleep"],
)
@pytest.mark.trio
async def test_op_returning_an_awaitable_fails_its_caller_only(
    make: Any, autojump_clock: Any
) -> None:
    def sneaky(resource: list[Any]) -> Any:
        resource.append("sneaky")
        return make()

    store = kt.memory_store(lambda key: [])
    rec = kt.recorder()
    async with keybatch.open_processor(
        load=rec.wrap_load(store.load), save=rec.wrap_save(store.save), min_duration=0.1
    ) as processor:
        results: list[Any] = []

        async def honest() -> None:
            results.append(await rec.run(processor, "a", append, 1))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(honest)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(TypeError, match="returned an awaitable"):
                await rec.run(processor, "a", sneaky)
        assert results == [1]
        await still_works(processor, "a", rec=rec)
    # No "coroutine was never awaited" warning (warnings are errors here), and
    # the sneaky op's mutation stays: keybatch does not roll back an op that
    # fails, so the batch saves what the op did to the resource before failing.
    assert store.data["a"] == [1, "sneaky", "ok"]
    outcome = [e for e in rec.events if e.kind == "outcome" and e.op == 1]
    assert isinstance(outcome[0].error, TypeError)


@pytest.mark.trio
async def test_op_submitting_on_its_own_key_lands_in_the_next_batch(
    autojump_clock: Any,
) -> None:
    store = kt.memory_store(lambda key: [])
    reports: list[keybatch.BatchReport] = []
    rec = kt.recorder()
    async with keybatch.open_processor(
        load=rec.wrap_load(store.load),
        save=rec.wrap_save(store.save),
        min_duration=0.1,
        on_batch=reports.append,
    ) as processor:
        inner: list[keybatch.Pending[int]] = []

        def chain(resource: list[Any], depth: int) -> int:
            resource.append(depth)
            if depth < 3:
                inner.append(rec.submit(processor, "a", chain, depth + 1))
            return len(resource)

        with kt.assert_elapsed(0.1):
            assert await rec.run(processor, "a", chain, 1) == 1
        with kt.assert_elapsed(0.2):  # two more batches, one after the other
            assert [await rec.result(p) for p in inner] == [2, 3]
        await still_works(processor, "a")
    assert [r.operations for r in reports if r.key == "a"] == [1, 1, 1, 1]
    assert store.data["a"] == [1, 2, 3, "ok"]
    # Not rec.check(): replaying `chain` would submit again.
    assert [e.op for e in rec.events if e.kind == "apply"] == [0, 1, 2]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, GeneratorExit])
@pytest.mark.trio
async def test_op_raising_base_exception_propagates_to_its_own_caller(
    exc: type[BaseException], autojump_clock: Any
) -> None:
    # Decided: an op's BaseException is that op's outcome, like any exception:
    # it is raised in the caller's task (where it propagates as usual, and a
    # KeyboardInterrupt still ends the program), not in the worker; the batch
    # goes on and saves the others' effects.
    raised = exc()

    def fatal(resource: list[Any]) -> None:
        raise raised

    store = kt.memory_store(lambda key: [])
    rec = kt.recorder()
    async with keybatch.open_processor(
        load=rec.wrap_load(store.load), save=rec.wrap_save(store.save), min_duration=0.1
    ) as processor:
        got: list[Any] = []

        async def bystander(x: int) -> None:
            got.append(await rec.run(processor, "a", append, x))

        async def victim() -> None:
            with pytest.raises(exc) as info:
                await rec.run(processor, "a", fatal)
            assert info.value is raised
            got.append("raised")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bystander, 1)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(victim)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(bystander, 2)
        assert sorted(got, key=str) == [1, 2, "raised"]
        assert processor.statistics().operation_failures == 1
        await still_works(processor, "a", rec=rec)
    assert store.data["a"] == [1, 2, "ok"]
    rec.check(store.data, complete=True)


@pytest.mark.trio
async def test_op_raising_stop_iteration(autojump_clock: Any) -> None:
    # Python turns a StopIteration leaving a coroutine into RuntimeError (PEP
    # 479); the caller gets that, caused by the op's StopIteration.
    raised = StopIteration(5)

    def stop(resource: list[Any]) -> None:
        raise raised

    store = kt.memory_store(lambda key: [])
    async with opener(store) as processor:
        with pytest.raises(RuntimeError, match="StopIteration") as info:
            await processor.run("a", stop)
        assert info.value.__cause__ is raised
        pending = processor.submit("a", stop)
        with pytest.raises(RuntimeError, match="StopIteration"):
            await pending.result()
        await still_works(processor, "a")
    assert store.data == {"a": ["ok"], "bystander": ["ok"]}


# --------------------------------------------------------------------------- load/save


@pytest.mark.trio
async def test_load_that_returns_without_awaiting(autojump_clock: Any) -> None:
    data: dict[str, list[Any]] = {}

    async def eager_load(key: str) -> list[Any]:
        return list(data.get(key, []))  # no await at all: never a checkpoint

    async def save(key: str, resource: list[Any]) -> None:
        data[key] = list(resource)
        await trio.lowlevel.checkpoint()

    async with keybatch.open_processor(
        load=eager_load, save=save, min_duration=0, workers=2
    ) as processor:
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(processor.submit(f"k{i % 20}", append, i).result)
        await processor.flush()
        assert trio.current_time() == 0
    assert sum(len(v) for v in data.values()) == 200
    assert data["k3"] == list(range(3, 200, 20))


@pytest.mark.trio
async def test_sync_load_returning_a_coroutine_is_refused_at_open() -> None:
    async def real(key: str) -> int:
        return 0

    with pytest.raises(TypeError, match="load must be an async function"):
        keybatch.open_processor(load=lambda key: real(key))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="save must be an async function"):
        keybatch.open_processor(save=print)  # type: ignore[arg-type]


@pytest.mark.trio
async def test_save_raising_during_stop(autojump_clock: Any) -> None:
    store = kt.memory_store(lambda key: [])
    store.inject("save", keys="a", error=RuntimeError)
    async with opener(store) as processor:
        doomed = processor.submit("a", append, 1)
        fine = processor.submit("b", append, 1)
    # Stopping closed both batches at once; "a"'s save failed, "b"'s worked.
    assert trio.current_time() == 0
    with pytest.raises(keybatch.SaveError) as info:
        await doomed.result()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert await fine.result() == 1
    stats = processor.statistics()
    assert (stats.keys, stats.pending_operations, stats.save_failures) == (0, 0, 1)
    assert store.data == {"b": [1]}


@pytest.mark.trio
async def test_save_raising_system_exit_during_stop_propagates(
    autojump_clock: Any,
) -> None:
    # A BaseException from load/save is not swallowed: the workers it hits stop,
    # the processor is torn down, and it propagates out of the `async with`
    # (in an exception group, as from any nursery). Callers still get outcomes.
    store = kt.memory_store(lambda key: [])
    store.inject("save", keys="a", error=lambda: SystemExit(3))
    with pytest.RaisesGroup(SystemExit, allow_unwrapped=True, flatten_subgroups=True):
        async with opener(store, workers=1) as processor:
            doomed = processor.submit("a", append, 1)
            other = processor.submit("b", append, 1)
    with pytest.raises(keybatch.SaveError) as info:
        await doomed.result()
    assert isinstance(info.value.__cause__, SystemExit)
    assert other.done()
    # "b" may have been queued behind "a" on the one worker: never applied
    with contextlib.suppress(keybatch.ProcessorStopped):
        assert await other.result() == 1
    assert processor.statistics().keys == 0


# --------------------------------------------------------------------------- hook


@pytest.mark.trio
async def test_on_batch_hook_raising_is_logged_and_ignored(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    def hook(report: keybatch.BatchReport) -> None:
        calls.append(report.key)
        raise RuntimeError("hook broke")

    store = kt.memory_store(lambda key: [])
    with caplog.at_level(logging.WARNING, logger="keybatch"):
        async with opener(store, on_batch=hook) as processor:
            assert await processor.run("a", append, 1) == 1
            await still_works(processor, "a")
    assert calls == ["a", "a", "bystander"]
    assert "on_batch hook raised" in caplog.text
    assert store.data == {"a": [1, "ok"], "bystander": ["ok"]}


@pytest.mark.trio
async def test_slow_on_batch_hook_delays_but_breaks_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A hook is plain code on the worker: a slow one holds that worker (here,
    # virtual time passes inside it). Results are still right and delivered.
    def slow(report: keybatch.BatchReport) -> None:
        autojump_clock.jump(0.02)

    store = kt.memory_store(lambda key: [])
    async with opener(store, on_batch=slow, workers=1) as processor:
        async with trio.open_nursery() as nursery:
            for key in "abc":
                nursery.start_soon(processor.run, key, append, 1)
        # the three windows ran together; three hooks ran one after the other
        assert trio.current_time() == pytest.approx(0.1 + 3 * 0.02)
        await still_works(processor, "a")
    assert store.data == {"a": [1, "ok"], "b": [1], "c": [1], "bystander": ["ok"]}


@pytest.mark.trio
async def test_on_batch_hook_raising_keyboard_interrupt_propagates(
    autojump_clock: Any,
) -> None:
    def hook(report: keybatch.BatchReport) -> None:
        raise KeyboardInterrupt

    store = kt.memory_store(lambda key: [])
    with pytest.RaisesGroup(
        KeyboardInterrupt, allow_unwrapped=True, flatten_subgroups=True
    ):
        async with opener(store, on_batch=hook) as processor:
            pending = processor.submit("a", append, 1)
            await trio.sleep_forever()
    assert await pending.result() == 1  # the batch was saved before the hook ran
    assert store.data == {"a": [1]}
    assert processor.statistics().keys == 0


@pytest.mark.parametrize("hook", [print, logging.info], ids=["print", "logging"])
@pytest.mark.trio
async def test_builtin_hooks_are_accepted(hook: Any, autojump_clock: Any) -> None:
    store = kt.memory_store(lambda key: [])
    async with opener(store, on_batch=hook) as processor:
        assert await processor.run("a", append, 1) == 1


@pytest.mark.trio
async def test_async_hook_is_refused_at_open() -> None:
    async def hook(report: keybatch.BatchReport) -> None: ...

    with pytest.raises(TypeError, match="on_batch must be a plain"):
        keybatch.open_processor(on_batch=hook)


# ----------------------------------------------------------- stop, threads, loops


@pytest.mark.trio
async def test_run_after_stop(autojump_clock: Any) -> None:
    store = kt.memory_store(lambda key: [])
    async with opener(store) as processor:
        assert await processor.run("a", append, 1) == 1
    with pytest.raises(keybatch.ProcessorStopped):
        await processor.run("a", append, 2)
    with pytest.raises(keybatch.ProcessorStopped):
        processor.submit("a", append, 2)
    await processor.aclose()  # again: returns at once
    await processor.flush()
    assert processor.statistics().stopping
    assert store.data == {"a": [1]}


@pytest.mark.trio
async def test_run_during_stop(autojump_clock: Any) -> None:
    store = kt.memory_store(lambda key: [])
    store.inject("save", latency=0.05)
    async with opener(store) as processor:
        processor.submit("a", append, 1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(processor.aclose)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(keybatch.ProcessorStopped):
                await processor.run("b", append, 2)
    assert store.data == {"a": [1]}


@pytest.mark.trio
async def test_run_from_another_thread_is_a_runtime_error(autojump_clock: Any) -> None:
    store = kt.memory_store(lambda key: [])
    async with opener(store) as processor:
        errors: list[BaseException] = []

        def in_thread() -> None:
            try:
                processor.submit("a", append, 1)
            except BaseException as exc:
                errors.append(exc)
            try:
                trio.run(processor.run, "a", append, 1)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=in_thread)
        thread.start()
        await trio.to_thread.run_sync(thread.join)
        assert [type(e) for e in errors] == [RuntimeError, RuntimeError]
        assert "thread" in str(errors[0])
        # The sanctioned way from a thread:
        value = await trio.to_thread.run_sync(
            lambda: trio.from_thread.run(processor.run, "a", append, 2)
        )
        assert value == 1
        await still_works(processor, "a")
    assert store.data == {"a": [2, "ok"], "bystander": ["ok"]}


@pytest.mark.trio
async def test_run_from_an_asyncio_loop_inside_trio(autojump_clock: Any) -> None:
    # asyncio.run() called from a trio task (same thread, another event loop).
    store = kt.memory_store(lambda key: [])
    async with opener(store) as processor:
        with pytest.raises(RuntimeError, match="event loop that opened it"):
            asyncio.run(processor.run("a", append, 1))
        pending = processor.submit("a", append, 1)  # submit does not wait: fine
        with pytest.raises(RuntimeError, match="event loop that opened it"):
            asyncio.run(pending.result())  # type: ignore[arg-type]
        assert await pending.result() == 1
        await still_works(processor, "a")
    assert store.data == {"a": [1, "ok"], "bystander": ["ok"]}


# Python 3.10 has no AsyncioEvent (asyncio.Event: a future per waiter, so
# nothing shared to corrupt): the caller gets trio's own TypeError.
if sys.version_info >= (3, 11):
    FOREIGN_LOOP_ERROR: type[Exception] = RuntimeError
    FOREIGN_LOOP_MESSAGE = "event loop that opened it"
else:  # pragma: no cover
    FOREIGN_LOOP_ERROR = TypeError
    FOREIGN_LOOP_MESSAGE = "other framework like asyncio"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
async def test_asyncio_processor_run_from_trio_inside_asyncio() -> None:
    # trio.run() called from an asyncio task: the asyncio processor's callers
    # that share the batch must not be broken by it.
    store = kt.memory_store(lambda key: [])
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=0.01
    ) as processor:
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


def test_processor_used_by_a_later_event_loop() -> None:
    store = kt.memory_store(lambda key: [])
    leaked: list[keybatch.Processor[Any]] = []

    async def first() -> None:
        async with opener(store, min_duration=0) as processor:
            leaked.append(processor)
            await processor.run("a", append, 1)

    async def second() -> None:
        with pytest.raises(keybatch.ProcessorStopped):
            await leaked[0].run("a", append, 2)

    kt.run_autojump(first)
    kt.run_autojump(second)
    assert store.data == {"a": [1]}
