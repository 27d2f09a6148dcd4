"""Versioned saves: `Conflict` replays, `max_replays`, `SaveError.may_have_landed`."""

from __future__ import annotations

import math
from typing import Any

import anyio
import pytest

import keybatch

pytestmark = pytest.mark.anyio


class VersionedStore:
    """A store whose save raises Conflict while another writer moved the row."""

    def __init__(self, conflicts: int = 0) -> None:
        self.value: dict[str, int] = {"balance": 0, "version": 0}
        self.conflicts_left = conflicts
        self.loads = 0
        self.saves = 0

    async def load(self, key: Any) -> dict[str, int]:
        self.loads += 1
        return dict(self.value)

    async def save(self, key: Any, resource: dict[str, int]) -> None:
        self.saves += 1
        if self.conflicts_left:
            self.conflicts_left -= 1
            # another process deposits 100 and bumps the version
            self.value = {
                "balance": self.value["balance"] + 100,
                "version": self.value["version"] + 1,
            }
            raise keybatch.Conflict("the stored version moved")
        if resource["version"] != self.value["version"]:  # pragma: no cover
            raise AssertionError("saved over a newer version")
        self.value = {**resource, "version": resource["version"] + 1}


def deposit(resource: dict[str, int], amount: int) -> int:
    resource["balance"] += amount
    return resource["balance"]


def withdraw(resource: dict[str, int], amount: int) -> int:
    if resource["balance"] < amount:
        raise ValueError("overdraft")
    resource["balance"] -= amount
    return resource["balance"]


async def test_a_conflict_reloads_and_reapplies_in_order() -> None:
    store = VersionedStore(conflicts=1)
    reports: list[keybatch.BatchReport] = []
    async with keybatch.open_processor(
        load=store.load, save=store.save, min_duration=0.1, on_batch=reports.append
    ) as processor:
        first = processor.submit("acct", deposit, 10)
        second = processor.submit("acct", deposit, 5)
        # callers see the final application's results: on top of the 100
        assert [await first.result(), await second.result()] == [110, 115]
        stats = processor.statistics()
    assert store.value == {"balance": 115, "version": 2}
    assert (store.loads, store.saves) == (2, 2)
    assert [r.replays for r in reports] == [1]
    assert reports[0].error is None
    assert stats.conflicts == 1
    assert stats.save_failures == 0


async def test_an_op_that_raises_only_in_the_replay_raises_to_its_caller() -> None:
    store = VersionedStore(conflicts=1)
    store.value["balance"] = 50

    async def load(key: Any) -> dict[str, int]:
        resource = await store.load(key)
        if store.loads == 2:
            resource["balance"] = 0  # the other writer withdrew everything
        return resource

    async with keybatch.open_processor(
        load=load, save=store.save, min_duration=0.1
    ) as processor:
        take = processor.submit("acct", withdraw, 30)
        add = processor.submit("acct", deposit, 1)
        with pytest.raises(ValueError, match="overdraft"):
            await take.result()
        assert await add.result() == 1


@pytest.mark.parametrize("max_replays", [0, 1, 3])
async def test_past_max_replays_each_caller_gets_a_save_error_not_landed(
    max_replays: int,
) -> None:
    store = VersionedStore(conflicts=10)
    reports: list[keybatch.BatchReport] = []
    async with keybatch.open_processor(
        load=store.load,
        save=store.save,
        min_duration=0.1,
        max_replays=max_replays,
        on_batch=reports.append,
    ) as processor:
        pendings = [processor.submit("acct", deposit, i) for i in range(3)]
        errors = []
        for pending in pendings:
            with pytest.raises(keybatch.SaveError) as info:
                await pending.result()
            errors.append(info.value)
        stats = processor.statistics()
    assert store.saves == max_replays + 1
    assert stats.conflicts == max_replays + 1
    assert stats.save_failures == 1
    assert len({id(e) for e in errors}) == 3  # each caller its own error
    for error in errors:
        assert error.may_have_landed is False
        assert isinstance(error.__cause__, keybatch.Conflict)
        assert error.key == "acct"
    [report] = reports
    assert report.replays == max_replays
    assert isinstance(report.error, keybatch.SaveError)
    assert report.error.may_have_landed is False


async def test_a_store_error_or_the_deadline_may_have_landed() -> None:
    async def broken(key: Any, resource: Any) -> None:
        raise OSError("connection reset after COMMIT was sent")

    async def slow(key: Any, resource: Any) -> None:
        await anyio.sleep(math.inf)

    async with keybatch.open_processor(save=broken, min_duration=0.1) as processor:
        with pytest.raises(keybatch.SaveError) as info:
            await processor.run("k", lambda r: 1)
    assert info.value.may_have_landed is True
    assert isinstance(info.value.__cause__, OSError)

    async with keybatch.open_processor(
        save=slow, min_duration=0.1, max_duration=0.3
    ) as processor:
        start = anyio.current_time()
        with pytest.raises(keybatch.SaveError) as info:
            await processor.run("k", lambda r: 1)
        assert anyio.current_time() - start == pytest.approx(0.3)
    assert info.value.may_have_landed is True
    assert isinstance(info.value.__cause__, TimeoutError)


async def test_a_failed_reload_fails_the_batch_with_load_error() -> None:
    store = VersionedStore(conflicts=1)

    async def load(key: Any) -> dict[str, int]:
        if store.loads == 1:
            store.loads += 1
            raise OSError("down")
        return await store.load(key)

    async with keybatch.open_processor(
        load=load, save=store.save, min_duration=0.1
    ) as processor:
        with pytest.raises(keybatch.LoadError):
            await processor.run("acct", deposit, 1)
        assert processor.statistics().load_failures == 1


@pytest.mark.parametrize(
    ("value", "error"), [(-1, ValueError), ("3", TypeError), (True, TypeError)]
)
def test_max_replays_is_validated(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="max_replays"):
        keybatch.open_processor(max_replays=value)
