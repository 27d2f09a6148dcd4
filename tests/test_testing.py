"""Tests of keybatch.testing: the faulty store, the history checker, virtual time."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Hashable
from typing import Any

import pytest
import trio
import trio.testing

import keybatch
from keybatch import testing as kt
from keybatch.testing import Event, HistoryViolation, check_history


class DiskFull(Exception):
    """The fault the tests inject."""


def append(resource: list[int], x: int) -> int:
    resource.append(x)
    return len(resource)


def fail_if_negative(resource: list[int], x: int) -> int:
    if x < 0:
        raise ValueError(x)
    resource.append(x)
    return len(resource)


def open_recorded(store: kt.MemoryStore[Any], rec: kt.Recorder, **options: Any) -> Any:
    options.setdefault("min_duration", 0.1)
    options.setdefault("workers", 2)
    return keybatch.open_processor(
        load=rec.wrap_load(store.load), save=rec.wrap_save(store.save), **options
    )


async def settle(
    rec: kt.Recorder, processor: keybatch.Processor[Any], key: str, op: Any, x: int
) -> None:
    with contextlib.suppress(keybatch.KeybatchError, ValueError):
        await rec.run(processor, key, op, x)


# --------------------------------------------------------------------------- store


@pytest.mark.trio
async def test_store_loads_initial_and_saves_deep_copies() -> None:
    store = kt.memory_store(lambda key: {"key": key, "items": []})
    first = await store.load("a")
    assert first == {"key": "a", "items": []}
    first["items"].append(1)
    await store.save("a", first)
    first["items"].append(2)  # the caller's object is not the stored one
    assert store.data == {"a": {"key": "a", "items": [1]}}
    again = await store.load("a")
    assert again == {"key": "a", "items": [1]}
    assert again is not store.data["a"]
    assert (store.loads, store.saves, store.failures) == (2, 1, 0)


@pytest.mark.trio
async def test_store_default_resource_is_none_and_data_seeds_it() -> None:
    store: kt.MemoryStore[Any] = kt.memory_store(data={"x": 5})
    assert await store.load("y") is None
    assert await store.load("x") == 5


@pytest.mark.trio
async def test_store_load_and_save_are_checkpoints() -> None:
    store = kt.memory_store(lambda key: 0)
    with trio.CancelScope() as scope:
        scope.cancel()
        await store.save("a", 1)
    assert scope.cancelled_caught
    assert store.data == {}  # cancelled before writing
    counted = store.inject("save", nth=1)  # fires, does nothing: still a checkpoint
    with trio.CancelScope() as scope:
        scope.cancel()
        await store.save("a", 1)
    assert scope.cancelled_caught
    assert (counted.fired, store.data) == (1, {})


@pytest.mark.trio
async def test_nth_call_fails_with_a_fresh_exception_each_time() -> None:
    store = kt.memory_store(lambda key: 0)
    rule = store.inject("save", nth={2, 3}, error=DiskFull)
    await store.save("a", 1)
    errors = []
    for value in (2, 3):
        with pytest.raises(DiskFull) as info:
            await store.save("a", value)
        errors.append(info.value)
    await store.save("a", 4)
    assert errors[0] is not errors[1]
    assert store.data == {"a": 4}
    assert (rule.calls, rule.fired, store.failures) == (4, 2, 2)


@pytest.mark.trio
async def test_keys_filter_and_times_limit() -> None:
    store = kt.memory_store(lambda key: 0)
    store.inject("load", keys={"bad", "worse"}, times=2, error=KeyError)
    assert await store.load("good") == 0
    with pytest.raises(KeyError):
        await store.load("bad")
    with pytest.raises(KeyError):
        await store.load("worse")
    assert await store.load("bad") == 0  # times=2 used up
    single = kt.memory_store(lambda key: 0)
    single.inject("both", keys="ab", error=DiskFull)  # a str is one key, not a set
    assert await single.load("a") == 0
    with pytest.raises(DiskFull):
        await single.save("ab", 1)


@pytest.mark.trio
async def test_probability_is_seeded_and_reproducible() -> None:
    async def failures(seed: int) -> list[int]:
        store = kt.memory_store(lambda key: 0, seed=seed)
        store.inject("load", probability=0.3, error=DiskFull)
        failed = []
        for i in range(200):
            try:
                await store.load(i)
            except DiskFull:
                failed.append(i)
        return failed

    first = await failures(7)
    assert first == await failures(7)
    assert first != await failures(8)
    assert 30 < len(first) < 90  # about 60 of 200


@pytest.mark.trio
async def test_predicate_sees_key_and_call_number() -> None:
    seen: list[tuple[Hashable, int]] = []

    def when(key: Hashable, n: int) -> bool:
        seen.append((key, n))
        return key == "b" and n % 2 == 0

    store = kt.memory_store(lambda key: 0)
    store.inject("save", when=when, error=RuntimeError)
    outcomes = []
    for key in "abab":
        try:
            await store.save(key, 1)
            outcomes.append("ok")
        except RuntimeError:
            outcomes.append("fail")
    assert seen == [("a", 1), ("b", 2), ("a", 3), ("b", 4)]
    assert outcomes == ["ok", "fail", "ok", "fail"]


@pytest.mark.trio
async def test_first_firing_rule_wins_and_remove(autojump_clock: Any) -> None:
    store = kt.memory_store(lambda key: 0)
    slow = store.inject("load", latency=0.5)
    store.inject("load", error=DiskFull)
    with kt.assert_elapsed(0.5):
        assert await store.load("a") == 0
    slow.remove()
    with pytest.raises(DiskFull):
        await store.load("a")
    store.clear_faults()
    assert await store.load("a") == 0


@pytest.mark.trio
async def test_latency_then_error(autojump_clock: Any) -> None:
    store = kt.memory_store(lambda key: 0)
    store.inject("save", latency=0.25, error=DiskFull)
    with kt.assert_elapsed(0.25), pytest.raises(DiskFull):
        await store.save("a", 1)


def test_inject_refuses_bad_rules() -> None:
    store = kt.memory_store(lambda key: 0)
    with pytest.raises(ValueError, match="at most one"):
        store.inject("load", error=DiskFull, hang=True)
    with pytest.raises(ValueError, match="probability"):
        store.inject("load", probability=1.5)
    with pytest.raises(ValueError, match="latency"):
        store.inject("load", latency=-1)
    with pytest.raises(ValueError, match="operation"):
        store.inject("delete", error=DiskFull)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="own instance"):
        store.inject("load", error=DiskFull("shared"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="no public constructor"):
        kt.MemoryStore()


@pytest.mark.trio
async def test_hanging_load_times_out_at_the_batch_deadline(
    autojump_clock: Any,
) -> None:
    store = kt.memory_store(lambda key: 0)
    store.inject("load", nth=1, hang=True)
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=0.1, max_duration=0.3
    ) as processor:
        with kt.assert_elapsed(0.3), pytest.raises(keybatch.LoadError) as info:
            await processor.run("a", lambda r: r)
        assert isinstance(info.value.__cause__, TimeoutError)
        assert await processor.run("a", lambda r: r + 1) == 1  # next call loads fine
    assert store.failures == 1


@pytest.mark.trio
async def test_hanging_save_times_out_and_saves_nothing(autojump_clock: Any) -> None:
    store = kt.memory_store(lambda key: [])
    store.inject("save", nth=1, hang=True)
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=0.1
    ) as processor:
        with kt.assert_elapsed(0.2), pytest.raises(keybatch.SaveError) as info:
            await processor.run("a", append, 1)
        assert isinstance(info.value.__cause__, TimeoutError)
        assert await processor.run("a", append, 2) == 1
    assert store.data == {"a": [2]}


@pytest.mark.trio
async def test_cancel_fault_tears_the_processor_down_during_load(
    autojump_clock: Any,
) -> None:
    store = kt.memory_store(lambda key: [])
    rec = kt.recorder()
    with trio.CancelScope() as scope:
        store.inject("load", cancel=scope)
        async with open_recorded(store, rec) as processor:
            pending = rec.submit(processor, "a", append, 1)
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert pending.done()
    with pytest.raises(keybatch.ProcessorStopped):
        await rec.result(pending)
    assert store.data == {}
    assert [e.kind for e in rec.events] == ["call", "load", "load_failed", "outcome"]
    rec.check(store.data, complete=True)


@pytest.mark.trio
async def test_cancel_fault_during_save_cannot_lose_the_save(
    autojump_clock: Any,
) -> None:
    store = kt.memory_store(lambda key: [])
    outer = trio.CancelScope()
    store.inject("save", nth=1, latency=0.05, cancel=outer)
    rec = kt.recorder()
    with outer:
        async with open_recorded(store, rec) as processor:
            pending = rec.submit(processor, "a", append, 1)
            await trio.sleep_forever()
    # The save is shielded: the cancel fault cannot cancel it, so it hangs
    # until the batch deadline and fails; the applied effect is reported lost.
    with pytest.raises(keybatch.SaveError):
        await rec.result(pending)
    assert trio.current_time() == 0.2
    rec.check(store.data, complete=True)


# --------------------------------------------------------------------------- recorder


@pytest.mark.trio
async def test_recorded_history_of_a_real_processor_checks_out(
    autojump_clock: Any,
) -> None:
    store = kt.memory_store(lambda key: [])
    store.inject("save", keys="a", nth=2, error=DiskFull)
    store.inject("load", keys="b", nth=1, error=DiskFull)
    rec = kt.recorder()
    async with open_recorded(store, rec) as processor:
        async with trio.open_nursery() as nursery:
            for i, key in enumerate("abababcc"):
                nursery.start_soon(settle, rec, processor, key, fail_if_negative, i)
                nursery.start_soon(settle, rec, processor, key, fail_if_negative, -i)
                await trio.sleep(0.07)
        pending = rec.submit(processor, "d", append, 1)
        assert rec.pending_unobserved() == 1
    await rec.collect()
    assert rec.pending_unobserved() == 0
    assert pending.done()
    rec.check(store.data, complete=True)
    kinds = {e.kind for e in rec.events}
    assert kinds == {
        "call",
        "apply",
        "outcome",
        "load",
        "loaded",
        "load_failed",
        "save",
        "saved",
        "save_failed",
    }
    check_history(rec.events, store.data, complete=True)


@pytest.mark.trio
async def test_wrap_logs_call_order_and_application(autojump_clock: Any) -> None:
    store = kt.memory_store(lambda key: [])
    rec = kt.recorder()
    async with open_recorded(store, rec) as processor:

        async def caller(x: int) -> None:
            # wrap() in the same expression as run(): the log keeps call order
            await processor.run("k", rec.wrap("k", append), x)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller, 1)
            nursery.start_soon(caller, 2)
    calls = [e for e in rec.events if e.kind == "call"]
    assert sorted((e.op, e.data[1]) for e in calls) in (
        [(0, (1,)), (1, (2,))],
        [(0, (2,)), (1, (1,))],
    )
    assert [e.op for e in rec.events if e.kind == "apply"] == [0, 1]
    rec.check(store.data, complete=True)


@pytest.mark.trio
async def test_wrapped_op_withdrawn_by_its_caller_is_not_lost(
    autojump_clock: Any,
) -> None:
    store = kt.memory_store(lambda key: [])
    rec = kt.recorder()
    async with open_recorded(store, rec) as processor:
        with trio.move_on_after(0.05):
            await processor.run("k", rec.wrap("k", append), 1)
        await processor.run("k", rec.wrap("k", append), 2)
    assert store.data == {"k": [2]}
    assert [e.data[3] for e in rec.events if e.kind == "call"] == ["wrap", "wrap"]
    rec.check(store.data, complete=True)  # no outcome is logged for wrap()


@pytest.mark.trio
async def test_recorder_logs_call_site_errors_as_outcomes() -> None:
    store = kt.memory_store(lambda key: [])
    rec = kt.recorder()
    async with open_recorded(store, rec, max_pending=1) as processor:
        rec.submit(processor, "k", append, 1)
        with pytest.raises(keybatch.Overloaded):
            rec.submit(processor, "k", append, 2)

        async def not_an_op(resource: list[int]) -> None:
            raise AssertionError("never runs")

        with pytest.raises(TypeError):
            await rec.run(processor, "k", not_an_op)
    with pytest.raises(keybatch.ProcessorStopped):
        await rec.run(processor, "k", append, 3)
    await rec.collect()
    outcomes = [type(e.error).__name__ for e in rec.events if e.kind == "outcome"]
    assert sorted(outcomes) == [
        "NoneType",
        "Overloaded",
        "ProcessorStopped",
        "TypeError",
    ]
    rec.check(store.data, complete=True)


class _BrokenProcessor:
    """Pretends to be a processor; applies ops wrongly in ways set by flags."""

    def __init__(self, store: Any, *, twice: bool = False, lose: bool = False) -> None:
        self.store = store
        self.twice = twice
        self.lose = lose

    async def run(self, key: str, op: Any, *args: Any) -> Any:
        resource = await self.store.load(key)
        value = op(resource, *args)
        if self.twice:
            op(resource, *args)
        if not self.lose:
            await self.store.save(key, resource)
        return value


@pytest.mark.trio
@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"twice": True}, "applied twice"),
        ({"lose": True}, "never saved"),
    ],
    ids=["applies-twice", "loses-saves"],
)
async def test_checker_catches_a_broken_processor(
    flags: dict[str, bool], expected: str
) -> None:
    store = kt.memory_store(lambda key: [])
    rec = kt.recorder()
    loader = rec.wrap_load(store.load)
    saver = rec.wrap_save(store.save)

    class Store:
        load = staticmethod(loader)
        save = staticmethod(saver)

    broken: Any = _BrokenProcessor(Store, **flags)
    await rec.run(broken, "k", append, 1)
    await rec.run(broken, "k", append, 2)
    with pytest.raises(HistoryViolation, match=expected):
        rec.check(store.data, complete=True)


@pytest.mark.trio
async def test_checker_catches_a_store_that_loses_saves() -> None:
    store = kt.memory_store(lambda key: [])
    rec = kt.recorder()

    async def forgetful_save(key: Hashable, resource: list[int]) -> None:
        await trio.lowlevel.checkpoint()

    async with keybatch.open_processor(
        load=rec.wrap_load(store.load), save=rec.wrap_save(forgetful_save)
    ) as processor:
        await rec.run(processor, "k", append, 1)
        await rec.run(processor, "k", append, 2)
    with pytest.raises(HistoryViolation, match="not the last state saved") as info:
        rec.check(complete=True)
    with pytest.raises(HistoryViolation, match="the store holds"):
        rec.check(store.data)
    assert info.value.problems


# Hand-made logs: each breaks one guarantee, and the checker must say which.


def _log(*rows: tuple[Any, ...]) -> list[Event]:
    return [Event(i, *row) for i, row in enumerate(rows)]


def _call(key: str, n: int, x: int = 0) -> tuple[Any, ...]:
    return (key, "call", n, (append, (x,), {}, "run"))


def _batch(
    key: str, loaded: list[int], *applies: tuple[int, int]
) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = [(key, "load"), (key, "loaded", None, list(loaded))]
    state = list(loaded)
    for n, x in applies:
        state.append(x)
        rows.append((key, "apply", n, len(state)))
    return rows


GOOD = _log(
    _call("k", 0, 5),
    _call("k", 1, 6),
    *_batch("k", [], (0, 5), (1, 6)),
    ("k", "save", None, [5, 6]),
    ("k", "saved"),
    ("k", "outcome", 0, 1),
    ("k", "outcome", 1, 2),
)


def test_checker_accepts_a_good_log() -> None:
    check_history(GOOD, {"k": [5, 6]}, complete=True)


def _shared_error() -> list[Event]:
    error = keybatch.LoadError("k", "load failed")
    return _log(
        _call("k", 0),
        _call("k", 1),
        ("k", "load"),
        ("k", "load_failed", None, None, DiskFull()),
        ("k", "outcome", 0, None, error),
        ("k", "outcome", 1, None, error),
    )


BAD = {
    "applied twice": _log(
        _call("k", 0, 5),
        *_batch("k", [], (0, 5), (0, 5)),
        ("k", "save", None, [5, 5]),
        ("k", "saved"),
    ),
    "against call order": _log(
        _call("k", 0, 5),
        _call("k", 1, 6),
        *_batch("k", [], (1, 6), (0, 5)),
        ("k", "save", None, [6, 5]),
        ("k", "saved"),
    ),
    "outside a loaded batch": _log(_call("k", 0), ("k", "apply", 0, 1)),
    "batches overlap": _log(
        _call("k", 0, 5),
        *_batch("k", [], (0, 5)),
        ("k", "save", None, [5]),
        ("k", "load"),
    ),
    "reported successful, not saved": _log(
        _call("k", 0, 5),
        *_batch("k", [], (0, 5)),
        ("k", "save", None, [5]),
        ("k", "save_failed", None, None, DiskFull()),
        ("k", "outcome", 0, 1),
    ),
    "never applied": _log(_call("k", 0), ("k", "outcome", 0, 1)),
    "caller got SaveError": _log(
        _call("k", 0, 5),
        *_batch("k", [], (0, 5)),
        ("k", "save", None, [5]),
        ("k", "saved"),
        ("k", "outcome", 0, None, keybatch.SaveError("k", "x")),
    ),
    "caller got LoadError but the op was applied": _log(
        _call("k", 0, 5),
        *_batch("k", [], (0, 5)),
        ("k", "save", None, [5]),
        ("k", "saved"),
        ("k", "outcome", 0, None, keybatch.LoadError("k", "x")),
    ),
    "on the loaded": _log(  # the save wrote something else than the replay
        _call("k", 0, 5),
        *_batch("k", [], (0, 5)),
        ("k", "save", None, [5, 5]),
        ("k", "saved"),
    ),
    "not the last state saved": _log(
        _call("k", 0, 5),
        *_batch("k", [], (0, 5)),
        ("k", "save", None, [5]),
        ("k", "saved"),
        ("k", "load"),
        ("k", "loaded", None, []),
    ),
    "one exception instance": _shared_error(),
    "lost": _log(_call("k", 0)),
    "the op raised": _log(
        _call("k", 0, 5),
        *_batch("k", [], (0, 5)),
        ("k", "save", None, [5]),
        ("k", "saved"),
        ("k", "outcome", 0, None, ValueError()),
    ),
    "returned": _log(  # the caller got another value than the op returned
        _call("k", 0, 5),
        *_batch("k", [], (0, 5)),
        ("k", "save", None, [5]),
        ("k", "saved"),
        ("k", "outcome", 0, 7),
    ),
    "two outcomes": [*GOOD, Event(len(GOOD), "k", "outcome", 0, 1)],
}


@pytest.mark.parametrize("problem", sorted(BAD))
def test_checker_reports_each_broken_guarantee(problem: str) -> None:
    with pytest.raises(HistoryViolation) as info:
        check_history(BAD[problem], complete=True)
    assert any(problem in p for p in info.value.problems), info.value.problems


def test_checker_compares_the_store_with_the_last_save() -> None:
    with pytest.raises(HistoryViolation, match="the store holds"):
        check_history(GOOD, {"k": [5]})
    with pytest.raises(HistoryViolation, match="the store holds"):
        check_history(GOOD, {})


def test_checker_without_complete_accepts_work_in_flight() -> None:
    in_flight = _log(_call("k", 0, 5), *_batch("k", [], (0, 5)))
    check_history(in_flight)
    with pytest.raises(HistoryViolation, match="never saved"):
        check_history(in_flight, complete=True)


# --------------------------------------------------------------------------- time


def test_run_autojump_runs_in_virtual_time() -> None:
    async def main(seconds: float) -> float:
        await trio.sleep(seconds)
        return trio.current_time()

    assert kt.run_autojump(main, 3600.0) == 3600.0
    clock = trio.testing.MockClock(autojump_threshold=0)
    clock.jump(10)
    assert kt.run_autojump(main, 1.0, clock=clock) == 11.0


@pytest.mark.trio
async def test_assert_elapsed_is_exact(autojump_clock: Any) -> None:
    with kt.assert_elapsed(0.1):
        await trio.sleep(0.1)
    with pytest.raises(AssertionError, match=r"expected 0\.1s"), kt.assert_elapsed(0.1):
        await trio.sleep(0.1000001)
    with kt.assert_elapsed(0):
        await trio.lowlevel.checkpoint()


@pytest.mark.trio
async def test_virtual_clock_fixture_gives_autojump_time(
    virtual_clock: trio.testing.MockClock,
) -> None:
    assert virtual_clock.autojump_threshold == 0
    start = trio.current_time()
    async with keybatch.open_processor(min_duration=60) as processor:
        await processor.run("k", lambda r: r)
    assert trio.current_time() - start == 60
    assert not math.isinf(start)


def test_the_fixtures_come_from_the_installed_pytest_plugin(
    pytestconfig: pytest.Config,
) -> None:
    # No conftest imports virtual_clock: pytest found it through the pytest11
    # entry point that keybatch's metadata declares.
    import importlib.metadata

    (entry,) = [
        e
        for e in importlib.metadata.entry_points(group="pytest11")
        if e.name == "keybatch"
    ]
    assert entry.value == "keybatch.testing._pytest_plugin"
    plugin = pytestconfig.pluginmanager.get_plugin("keybatch")
    assert plugin is not None
    assert plugin.__name__ == "keybatch.testing._pytest_plugin"
    assert not hasattr(kt, "virtual_clock")  # no pytest import in keybatch.testing


# --------------------------------------------------------------------------- asyncio


@pytest.mark.anyio
async def test_store_and_recorder_on_asyncio() -> None:
    store = kt.memory_store(lambda key: [])
    store.inject("save", nth=1, error=DiskFull)
    rec = kt.recorder()
    async with open_recorded(store, rec, min_duration=0) as processor:
        with pytest.raises(keybatch.SaveError):
            await rec.run(processor, "k", append, 1)
        assert await rec.run(processor, "k", append, 2) == 1
        pending = rec.submit(processor, "k", append, 3)
    await rec.collect()
    assert pending.done()
    assert store.data == {"k": [2, 3]}
    rec.check(store.data, complete=True)
