"""docs/semantics.md, "What is not guaranteed": the limits, checked as they are
documented. No re-entrance from `load` or `save` (one awaiting `run` on its own
key waits for its own batch until `max_duration` cancels it); submitting from an
operation is the way, and lands in the next batch. (No order between keys:
tests/semantics/test_worker_io.py; no bound on an operation's run time:
tests/semantics/test_deadline.py.)"""

from __future__ import annotations

from typing import Any

import pytest

import keybatch

from ..helpers import append, kt, list_store, now, still_works

pytestmark = pytest.mark.anyio


async def test_an_operation_submitting_on_its_own_key_lands_in_the_next_batch() -> None:
    store = list_store()
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


@pytest.mark.parametrize("where", ["load", "save"])
async def test_load_or_save_awaiting_run_on_its_own_key_waits_for_the_deadline(
    where: str,
) -> None:
    inner: list[BaseException] = []

    async def reenter(key: str) -> None:
        try:
            await processor.run(key, append, "inner")
        except BaseException as exc:
            inner.append(exc)
            raise

    async def load(key: str) -> list[Any]:
        if where == "load" and key == "k":
            await reenter(key)
        return []

    async def save(key: str, resource: list[Any]) -> None:
        if where == "save" and key == "k":
            await reenter(key)

    error = keybatch.LoadError if where == "load" else keybatch.SaveError
    async with keybatch.open_processor(
        load=load, save=save, min_duration=0.25, max_duration=1.0
    ) as processor:
        with pytest.raises(error) as info:
            await processor.run("k", append, "outer")
        assert isinstance(info.value.__cause__, TimeoutError)
        assert now() == 1.0  # the deadline cut it
    # the inner call was withdrawn with its caller (or, once applied, saved
    # with the next batch): it never deadlocks the processor
    assert len(inner) == 1
    stats = processor.statistics()
    assert (stats.keys, stats.pending_operations) == (0, 0)
