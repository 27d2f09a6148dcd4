"""docs/semantics.md, point 1 (Routing): a fixed pool of `workers` tasks; a key
always goes to `worker_for_key(key, workers)`; str and bytes keys with the
default router, any other type a TypeError at the call, a router result outside
`range(workers)` a ValueError at the call."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import keybatch

from ..helpers import append, list_store, opener, still_works

pytestmark = pytest.mark.anyio


class _StrKey(str):
    pass


class _BytesKey(bytes):
    pass


@pytest.mark.parametrize(
    ("workers", "keys"),
    [
        (7, ["a", "b", b"c", "ключ", ""]),
        (4, [f"key{i}" for i in range(200)]),
        (1, ["a", b"b"]),
    ],
    ids=["mixed", "200 keys", "one worker"],
)
async def test_each_key_goes_to_worker_for_key(workers: int, keys: list[Any]) -> None:
    reports: list[keybatch.BatchReport] = []
    async with keybatch.open_processor(
        workers=workers, min_duration=0, on_batch=reports.append
    ) as processor:
        assert processor.statistics().workers == workers
        async with anyio.create_task_group() as tg:
            for key in keys:
                tg.start_soon(processor.run, key, lambda r: None)
    assert sorted(map(repr, (r.key for r in reports))) == sorted(map(repr, keys))
    for report in reports:
        assert report.operations == 1
        assert report.worker == keybatch.worker_for_key(report.key, workers)
    # 200 keys spread over every worker of the pool
    assert {r.worker for r in reports} == {
        keybatch.worker_for_key(k, workers) for k in keys
    }
    if len(keys) == 200:
        assert {r.worker for r in reports} == set(range(workers))


@pytest.mark.parametrize(
    "key", [42, 4.2, None, ("a",), frozenset(), b"x"[0], bytearray(b"x")], ids=repr
)
@pytest.mark.timeless
async def test_key_of_another_type_is_a_type_error_at_the_call(key: Any) -> None:
    store = list_store()
    async with opener(store, min_duration=0) as processor:
        with pytest.raises(TypeError, match="keys must be str or bytes"):
            await processor.run(key, append, 1)
        with pytest.raises(TypeError, match="keys must be str or bytes"):
            processor.submit(key, append, 1)
        stats = processor.statistics()
        assert (stats.keys, stats.pending_operations) == (0, 0)  # nothing left
        await still_works(processor, "a")
    assert store.loads == store.saves == 2


@pytest.mark.parametrize(
    "key",
    ["\ud800", "ok\udfff", "a\ud83d", "\udc80" * 1000, _StrKey("\ud800")],
    ids=repr,
)
@pytest.mark.timeless
async def test_str_key_not_utf8_encodable_is_a_value_error_at_the_call(
    key: str,
) -> None:
    # mmh3 5.x crashes the interpreter on a str holding a lone surrogate: the
    # router must encode first. Reaching the assertions at all is half the test.
    with pytest.raises(ValueError, match="not UTF-8 encodable"):
        keybatch.worker_for_key(key, 8)
    store = list_store()
    async with opener(store, min_duration=0) as processor:
        with pytest.raises(ValueError, match="not UTF-8 encodable") as info:
            await processor.run(key, append, 1)
        assert isinstance(info.value.__cause__, UnicodeEncodeError)
        with pytest.raises(ValueError, match="not UTF-8 encodable"):
            processor.submit(key, append, 1)
        stats = processor.statistics()
        assert (stats.keys, stats.pending_operations) == (0, 0)
        await still_works(processor, "a")


@pytest.mark.parametrize(
    "key",
    ["", b"", "k" * 2**20, b"k" * 2**20, _StrKey("fine"), _BytesKey(b"fine")],
    ids=["empty str", "empty bytes", "1 MiB str", "1 MiB bytes", "str", "bytes"],
)
async def test_str_and_bytes_keys_of_any_length_are_keys(key: Any) -> None:
    store = list_store()
    async with opener(store) as processor:
        start = anyio.current_time()
        assert await processor.run(key, append, 1) == 1
        assert anyio.current_time() - start == 0.1  # one window, no more
        assert await processor.run(key, append, 2) == 2
        longer = key + (b"x" if isinstance(key, bytes) else "x")
        assert await processor.run(longer, append, 1) == 1  # another key
        await still_works(processor, key)
    assert store.data[key] == [1, 2, "ok"]
    assert keybatch.worker_for_key(key, 7) == keybatch.worker_for_key(key, 7)


@pytest.mark.parametrize(
    "key", [42, ("a", 1), (3, "x"), frozenset({1}), None], ids=repr
)
@pytest.mark.timeless
async def test_any_hashable_key_works_with_a_custom_router(key: Any) -> None:
    store = list_store()
    async with opener(
        store, min_duration=0, workers=2, worker_for_key=lambda key, n: hash(key) % n
    ) as processor:
        assert await processor.run(key, append, 1) == 1
        assert await processor.run(key, append, 2) == 2
    assert store.data == {key: [1, 2]}


@pytest.mark.parametrize(
    ("returned", "shown"),
    [(lambda n: n, "2"), (lambda n: -1, "-1"), (lambda n: 1.0, "1.0"),
     (lambda n: True, "True"), (lambda n: "0", "'0'")],
    ids=["n", "-1", "float", "bool", "str"],
)  # fmt: skip
@pytest.mark.timeless
async def test_router_result_outside_the_range_is_a_value_error_at_the_call(
    returned: Any, shown: str
) -> None:
    store = list_store()
    async with opener(
        store,
        min_duration=0,
        workers=2,
        worker_for_key=lambda key, n: returned(n) if key == "x" else 0,
    ) as processor:
        with pytest.raises(ValueError, match=f"worker_for_key returned {shown} for"):
            await processor.run("x", append, 1)
        with pytest.raises(ValueError, match=r"expected an int in range\(2\)"):
            processor.submit("x", append, 1)
        assert processor.statistics().pending_operations == 0
        await still_works(processor, "a")
