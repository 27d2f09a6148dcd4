"""Type-checked by mypy --strict and pyright (`nox -s types`); never run.

What a user's type checker infers from keybatch.testing.
"""

from __future__ import annotations

from collections.abc import Hashable

import trio
from typing_extensions import assert_type

import keybatch
from keybatch import testing as kt


def initial(key: Hashable) -> list[int]:
    return []


def append(resource: list[int], x: int) -> int:
    resource.append(x)
    return len(resource)


async def main() -> None:
    store = kt.memory_store(initial, seed=1)
    assert_type(store, kt.MemoryStore[list[int]])
    assert_type(await store.load("k"), list[int])
    rule = store.inject("save", keys="k", nth=2, error=OSError)
    assert_type(rule, kt.Injection)
    assert_type(rule.calls, int)
    rule.remove()

    rec = kt.recorder()
    assert_type(rec, kt.Recorder)
    async with keybatch.open_processor(
        load=rec.wrap_load(store.load), save=rec.wrap_save(store.save)
    ) as processor:
        assert_type(processor, keybatch.Processor[list[int]])
        assert_type(await rec.run(processor, "k", append, 1), int)
        pending = rec.submit(processor, "k", append, 2)
        assert_type(pending, keybatch.Pending[int])
        assert_type(await rec.result(pending), int)
        wrapped = rec.wrap("k", append)  # keeps the op's signature
        assert_type(wrapped([], 3), int)
        assert_type(await processor.run("k", wrapped, 3), int)
    await rec.collect()
    rec.check(store.data, complete=True)
    kt.check_history(rec.events, store.data, complete=True)
    for event in rec.events:
        assert_type(event, kt.Event)
        assert_type(event.kind, str)
        assert_type(event.error, BaseException | None)
    with kt.assert_elapsed(0.1):
        await trio.sleep(0.1)


async def answer(x: int) -> str:
    return str(x)


assert_type(kt.run_autojump(answer, 42), str)
