"""keybatch.testing for the core v2: replays after Conflict, store writes, sections.

Hand-made logs check that each new rule of the history checker accepts what the
processor may do and names what it must not; real processors (every backend)
check that the store's versioned mode, its external writes and faults after the
write, and `Recorder.watch` / `Recorder.exclusive` log what happened.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import keybatch
from keybatch import testing as kt
from keybatch.testing import Event, HistoryViolation, check_history


class DiskFull(Exception):
    """The fault the tests inject."""


def append(resource: list[int], x: int) -> int:
    resource.append(x)
    return len(resource)


def _log(*rows: tuple[Any, ...]) -> list[Event]:
    return [Event(i, *row) for i, row in enumerate(rows)]


def _call(key: str, n: int, x: int = 0) -> tuple[Any, ...]:
    return (key, "call", n, (append, (x,), {}, "run"))


def _attempt(
    key: str, loaded: list[int], *ops: tuple[int, int], written: bool = True
) -> list[tuple[Any, ...]]:
    """load, loaded, apply each (n, x), save (and the store's write if `written`)."""
    rows: list[tuple[Any, ...]] = [(key, "load"), (key, "loaded", None, list(loaded))]
    state = list(loaded)
    for n, x in ops:
        state.append(x)
        rows.append((key, "apply", n, len(state)))
    rows.append((key, "save", None, list(state)))
    if written:
        rows.append((key, "write", None, list(state)))
    return rows


def _conflict() -> keybatch.Conflict:
    return keybatch.Conflict("moved")


# A batch refused with Conflict (another writer wrote [9]), replayed on top of it.
REPLAYED = _log(
    _call("k", 0, 5),
    _call("k", 1, 6),
    *_attempt("k", [], (0, 5), (1, 6), written=False),
    ("k", "external", None, [9]),
    ("k", "save_failed", None, None, _conflict()),
    *_attempt("k", [9], (0, 5), (1, 6)),
    ("k", "saved"),
    ("k", "outcome", 0, 2),
    ("k", "outcome", 1, 3),
)


def test_a_replay_after_conflict_is_accepted() -> None:
    check_history(REPLAYED, {"k": [9, 5, 6]}, complete=True)


def test_a_replay_whose_reload_failed_gives_load_error() -> None:
    log = _log(
        _call("k", 0, 5),
        *_attempt("k", [], (0, 5), written=False),
        ("k", "save_failed", None, None, _conflict()),
        ("k", "load"),
        ("k", "load_failed", None, None, DiskFull()),
        ("k", "outcome", 0, None, keybatch.LoadError("k", "reload failed")),
    )
    check_history(log, {}, complete=True)


def test_replays_exhausted_give_save_error_that_did_not_land() -> None:
    refused = keybatch.SaveError("k", "refused", may_have_landed=False)
    log = _log(
        _call("k", 0, 5),
        *_attempt("k", [], (0, 5), written=False),
        ("k", "save_failed", None, None, _conflict()),
        ("k", "outcome", 0, None, refused),
    )
    check_history(log, {}, complete=True)


def test_a_save_that_failed_after_its_write_landed_counts_as_stored() -> None:
    log = _log(
        _call("k", 0, 5),
        _call("k", 1, 6),
        *_attempt("k", [], (0, 5)),  # written...
        ("k", "save_failed", None, None, DiskFull()),  # ... then the save raised
        ("k", "outcome", 0, None, keybatch.SaveError("k", "x", may_have_landed=True)),
        *_attempt("k", [5], (1, 6)),  # the next batch loads what landed
        ("k", "saved"),
        ("k", "outcome", 1, 2),
    )
    check_history(log, {"k": [5, 6]}, complete=True)


SECTION_CALL = ("k", "section", 1, (("k",), True, None))
SECTION_OK = _log(
    _call("k", 0, 5),
    SECTION_CALL,
    _call("k", 2, 6),
    *_attempt("k", [], (0, 5)),
    ("k", "saved"),
    ("k", "outcome", 0, 1),
    ("k", "outcome", 1, None),  # entered
    ("k", "held", 1),
    ("k", "released", 1),
    *_attempt("k", [5], (2, 6)),
    ("k", "saved"),
    ("k", "outcome", 2, 2),
)


def test_a_section_between_two_batches_is_accepted() -> None:
    check_history(SECTION_OK, {"k": [5, 6]}, complete=True)


BAD = {
    "applied twice": _log(  # applied again after a save that failed, not Conflict
        _call("k", 0, 5),
        *_attempt("k", [], (0, 5), written=False),
        ("k", "save_failed", None, None, DiskFull()),
        *_attempt("k", [], (0, 5)),
        ("k", "saved"),
        ("k", "outcome", 0, 1),
    ),
    "a replay applied ops": _log(  # the replay dropped op 1
        _call("k", 0, 5),
        _call("k", 1, 6),
        *_attempt("k", [], (0, 5), (1, 6), written=False),
        ("k", "save_failed", None, None, _conflict()),
        *_attempt("k", [], (0, 5)),
        ("k", "saved"),
        ("k", "outcome", 0, 1),
        ("k", "outcome", 1, None, keybatch.SaveError("k", "x")),
    ),
    "at position": _log(  # the replay changed the order
        _call("k", 0, 5),
        _call("k", 1, 6),
        *_attempt("k", [], (0, 5), (1, 6), written=False),
        ("k", "save_failed", None, None, _conflict()),
        *_attempt("k", [], (1, 6), (0, 5)),
        ("k", "saved"),
    ),
    "raised Conflict": _log(  # the store wrote, then said Conflict
        _call("k", 0, 5),
        *_attempt("k", [], (0, 5)),
        ("k", "save_failed", None, None, _conflict()),
    ),
    "may_have_landed=False": _log(  # not refused: it may have landed
        _call("k", 0, 5),
        *_attempt("k", [], (0, 5)),
        ("k", "save_failed", None, None, DiskFull()),
        ("k", "outcome", 0, None, keybatch.SaveError("k", "x", may_have_landed=False)),
    ),
    "nothing landed": _log(  # refused by Conflict, but told it may have landed
        _call("k", 0, 5),
        *_attempt("k", [], (0, 5), written=False),
        ("k", "save_failed", None, None, _conflict()),
        ("k", "outcome", 0, None, keybatch.SaveError("k", "x", may_have_landed=True)),
    ),
    "caller got LoadError but the op was applied": _log(
        _call("k", 0, 5),
        *_attempt("k", [], (0, 5)),
        ("k", "saved"),
        ("k", "outcome", 0, None, keybatch.LoadError("k", "x")),
    ),
    "the store wrote nothing": _log(
        ("j", "external", None, [1]),  # the store is watched: writes are logged
        _call("k", 0, 5),
        *_attempt("k", [], (0, 5), written=False),
        ("k", "saved"),
        ("k", "outcome", 0, 1),
    ),
    "the save was given": _log(
        _call("k", 0, 5),
        *_attempt("k", [], (0, 5), written=False),
        ("k", "write", None, [7]),
        ("k", "saved"),
    ),
    "not the last state stored": _log(  # the load missed another writer's write
        _call("k", 0, 5),
        ("k", "external", None, [9]),
        *_attempt("k", [], (0, 5)),
        ("k", "saved"),
        ("k", "outcome", 0, 1),
    ),
    "while a save of it was in flight": _log(  # held during the batch's save
        _call("k", 0, 5),
        SECTION_CALL,
        *_attempt("k", [], (0, 5)),
        ("k", "outcome", 1, None),
        ("k", "held", 1),
        ("k", "saved"),
    ),
    "while section 1 held the key": _log(  # a batch ran while it held the key
        SECTION_CALL,
        ("k", "outcome", 1, None),
        ("k", "held", 1),
        ("k", "load"),
    ),
    "before section 1, called before it, ended": _log(  # op 2 passed the section
        SECTION_CALL,
        _call("k", 2, 6),
        *_attempt("k", [], (2, 6)),
        ("k", "saved"),
    ),
    "after section 1, called after it, took the key": _log(
        _call("k", 0, 5),
        SECTION_CALL,
        ("k", "outcome", 1, None),
        ("k", "held", 1),
        ("k", "released", 1),
        *_attempt("k", [], (0, 5)),
        ("k", "saved"),
        ("k", "outcome", 0, 1),
    ),
    "never released": _log(SECTION_CALL, ("k", "outcome", 1, None), ("k", "held", 1)),
    "section 1 on keys ['k']: no outcome": _log(SECTION_CALL),
    "no outcome": _log(  # applied and saved, but its caller never got anything
        _call("k", 0, 5), *_attempt("k", [], (0, 5)), ("k", "saved")
    ),
}


@pytest.mark.parametrize("problem", sorted(BAD))
def test_checker_names_each_broken_rule(problem: str) -> None:
    with pytest.raises(HistoryViolation) as info:
        check_history(BAD[problem], complete=True)
    assert any(problem in p for p in info.value.problems), info.value.problems


def test_the_store_is_checked_against_the_last_write() -> None:
    with pytest.raises(HistoryViolation, match="the last write wrote"):
        check_history(REPLAYED, {"k": [5, 6]})  # the external write was lost


# --------------------------------------------------------------------------- store


@pytest.mark.anyio
async def test_versioned_store_refuses_a_stale_save() -> None:
    store = kt.memory_store(lambda key: [], versioned=True)
    resource = await store.load("k")
    store.write("k", [9])  # another writer
    with pytest.raises(keybatch.Conflict):
        await store.save("k", [*resource, 1])
    assert store.data == {"k": [9]}
    assert store.conflicts == 1
    resource = await store.load("k")
    await store.save("k", [*resource, 1])
    await store.save("k", [*resource, 1, 2])  # the writer holds the version it wrote
    assert store.data == {"k": [9, 1, 2]}
    assert store.versions == {"k": 3}


@pytest.mark.anyio
async def test_an_unversioned_store_lets_the_last_writer_win() -> None:
    store = kt.memory_store(lambda key: [])
    await store.load("k")
    store.write("k", [9])
    await store.save("k", [1])
    assert store.data == {"k": [1]}


@pytest.mark.anyio
async def test_external_fault_writes_first_then_the_save_conflicts() -> None:
    store = kt.memory_store(lambda key: [0], versioned=True)
    store.inject("save", nth=1, external=lambda resource: [*resource, 9])
    resource = await store.load("k")
    with pytest.raises(keybatch.Conflict):
        await store.save("k", [*resource, 1])
    assert store.data == {"k": [0, 9]}
    with pytest.raises(keybatch.Conflict):  # still stale: reload first
        await store.save("k", [*resource, 1])
    resource = await store.load("k")
    await store.save("k", [*resource, 1])
    assert store.data == {"k": [0, 9, 1]}
    assert store.conflicts == 2


@pytest.mark.anyio
async def test_after_fault_lets_the_write_land_then_fails() -> None:
    store = kt.memory_store(lambda key: [])
    store.inject("save", nth=1, after=True, error=DiskFull)
    with pytest.raises(DiskFull):
        await store.save("k", [1])
    assert store.data == {"k": [1]}
    assert store.failures == 1


def test_external_must_be_callable() -> None:
    store = kt.memory_store()
    with pytest.raises(TypeError, match="external"):
        store.inject("save", external=[1])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- processors


def _open(store: kt.MemoryStore[Any], rec: kt.Recorder, **options: Any) -> Any:
    options.setdefault("min_duration", 0.05)
    return keybatch.open_processor(
        load=rec.wrap_load(store.load), save=rec.wrap_save(store.save), **options
    )


@pytest.mark.anyio
async def test_conflict_replays_apply_each_op_once_on_top_of_the_other_writer() -> None:
    store = kt.memory_store(lambda key: [], versioned=True)
    rec = kt.recorder()
    rec.watch(store)
    store.inject("save", keys="k", nth=1, external=lambda resource: [*resource, 100])
    async with _open(store, rec, max_replays=2) as processor:
        async with anyio.create_task_group() as tg:
            for x in (1, 2):
                tg.start_soon(rec.run, processor, "k", append, x)
                await anyio.sleep(0.001)  # called in this order, in one window
        assert processor.statistics().conflicts == 1
    rec.check(store.data, complete=True)
    assert store.data == {"k": [100, 1, 2]}
    assert [e.kind for e in rec.events].count(kt.EXTERNAL) == 1
    assert [e.kind for e in rec.events].count(kt.WRITE) == 1


@pytest.mark.anyio
async def test_conflicts_past_max_replays_are_refused_and_never_stored() -> None:
    store = kt.memory_store(lambda key: [], versioned=True)
    rec = kt.recorder()
    rec.watch(store)
    store.inject("save", keys="k", external=lambda resource: [*resource, 100])
    async with _open(store, rec, max_replays=1) as processor:
        with pytest.raises(keybatch.SaveError) as info:
            await rec.run(processor, "k", append, 1)
    assert not info.value.may_have_landed
    assert isinstance(info.value.__cause__, keybatch.Conflict)
    rec.check(store.data, complete=True)
    assert store.data == {"k": [100, 100]}  # two other writes, none of ours


@pytest.mark.anyio
async def test_a_write_that_landed_before_the_save_failed_is_the_next_load() -> None:
    store = kt.memory_store(lambda key: [])
    rec = kt.recorder()
    rec.watch(store)
    store.inject("save", keys="k", nth=1, after=True, error=DiskFull)
    async with _open(store, rec) as processor:
        with pytest.raises(keybatch.SaveError) as info:
            await rec.run(processor, "k", append, 1)
        assert info.value.may_have_landed
        await rec.run(processor, "k", append, 2)
    rec.check(store.data, complete=True)
    assert store.data == {"k": [1, 2]}


@pytest.mark.anyio
async def test_recorder_logs_a_section_held_between_batches() -> None:
    store = kt.memory_store(lambda key: [])
    rec = kt.recorder()
    rec.watch(store)
    async with _open(store, rec) as processor:
        async with anyio.create_task_group() as tg:
            tg.start_soon(rec.run, processor, "k", append, 1)
            await anyio.wait_all_tasks_blocked()
            async with rec.exclusive(processor, "k", "k"):
                assert processor.statistics().exclusive_sections == 1
                tg.start_soon(rec.run, processor, "k", append, 2)
                await anyio.sleep(0.2)  # op 2 waits for the section
                assert store.data == {"k": [1]}
    rec.check(store.data, complete=True)
    kinds = [(e.kind, e.op) for e in rec.events if e.kind in ("held", "released")]
    assert kinds == [("held", 1), ("released", 1)]  # one per distinct key


@pytest.mark.anyio
async def test_recorder_logs_a_busy_section_as_its_outcome() -> None:
    store = kt.memory_store(lambda key: [])
    rec = kt.recorder()
    async with _open(store, rec) as processor:
        pending = rec.submit(processor, "k", append, 1)
        with pytest.raises(keybatch.KeyBusy):
            async with rec.exclusive(processor, "k", wait=False):
                pass  # pragma: no cover
        await rec.result(pending)
    rec.check(store.data, complete=True)
    [outcome] = [e for e in rec.events if e.kind == "outcome" and e.op == 1]
    assert isinstance(outcome.error, keybatch.KeyBusy)
