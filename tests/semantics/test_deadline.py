"""docs/semantics.md, point 6 (Deadline): load and save run under one deadline,
`start + max_duration`; past it they are cancelled and every caller gets a
LoadError or SaveError caused by a TimeoutError (`may_have_landed=True` for the
save). The deadline acts through cancellation: work that reaches no
cancellable await and returns counts as on time. `max_duration` defaults to
`2 * min_duration`; with `min_duration=0` there is none."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

import keybatch

from ..helpers import Account, Store, jump, now

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("load_delay", "save_delay", "error"),
    [
        (10, 0, keybatch.LoadError),
        (0, 10, keybatch.SaveError),
        (0.25, 0.25, keybatch.SaveError),
    ],
    ids=["load", "save", "load then save"],
)
async def test_load_or_save_past_the_deadline_fails_every_caller(
    load_delay: float, save_delay: float, error: type[keybatch.BatchError]
) -> None:
    store = Store(load_delay=load_delay, save_delay=save_delay)
    reports: list[keybatch.BatchReport] = []
    results: list[BaseException] = []

    async def call(amount: int) -> None:
        try:
            await processor.run("k", Account.deposit, amount)
        except keybatch.BatchError as exc:
            results.append(exc)

    async with store.open(
        min_duration=0.125, max_duration=0.375, on_batch=reports.append
    ) as processor:
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 1)
            tg.start_soon(call, 2)
        assert now() == 0.375  # exactly the deadline
        store.load_delay = store.save_delay = 0  # the next batch has its own
        assert await processor.run("k", Account.deposit, 5) == 5
        assert now() == 0.5
    assert [type(e) for e in results] == [error, error]
    assert results[0] is not results[1]
    for exc in results:
        assert isinstance(exc.__cause__, TimeoutError)
        assert "max_duration=0.375" in str(exc.__cause__)
        assert exc.key == "k"
        if isinstance(exc, keybatch.SaveError):
            assert exc.may_have_landed is True  # the cut-off save may have written
    assert store.data == {"k": 5}
    assert [(t, balance) for t, _, balance in store.saves] == [(0.5, 5)]
    stats = processor.statistics()
    assert (stats.load_failures, stats.save_failures) == (
        (1, 0) if error is keybatch.LoadError else (0, 1)
    )
    report = reports[0]
    assert isinstance(report.error, error)
    assert report.duration == 0.375


@pytest.mark.parametrize("with_save", [True, False], ids=["save", "no save"])
async def test_a_slow_operation_delays_the_close_but_not_the_deadline(
    with_save: bool,
) -> None:
    """An operation runs on the worker: 5 s of it push the save past the
    deadline (start + 1.0); without a save the caller just gets its value late."""
    saves = []

    async def save(key: str, resource: None) -> None:
        await anyio.lowlevel.checkpoint()
        saves.append(key)

    def slow(resource: None) -> str:
        jump(5.0)  # the operation runs for 5 virtual seconds
        return "done"

    async with keybatch.open_processor(
        save=save if with_save else None, min_duration=0.125, max_duration=1.0
    ) as processor:
        if with_save:
            with pytest.raises(keybatch.SaveError) as info:
                await processor.run("a", slow)
            assert isinstance(info.value.__cause__, TimeoutError)
        else:
            assert await processor.run("a", slow) == "done"
        assert now() == 5.125
    assert saves == []


@pytest.mark.parametrize("where", ["load", "save"])
async def test_work_that_reaches_no_await_after_the_deadline_counts_as_on_time(
    where: str,
) -> None:
    data = {}

    async def load(key: str) -> Account:
        if where == "load":
            jump(10)  # blocks the loop past the deadline, never yields
        return Account()

    async def save(key: str, account: Account) -> None:
        if where == "save":
            jump(10)
        data[key] = account.balance

    async with keybatch.open_processor(
        load=load, save=save, min_duration=0.125, max_duration=0.25
    ) as processor:
        assert await processor.run("k", Account.deposit, 3) == 3
        assert now() == 10.125 if where == "save" else 10.0
    assert data == {"k": 3}


async def test_max_duration_defaults_to_twice_min_duration() -> None:
    store = Store(load_delay=100)
    async with store.open(min_duration=0.25) as processor:
        with pytest.raises(keybatch.LoadError) as info:
            await processor.run("k", Account.deposit, 1)
        assert isinstance(info.value.__cause__, TimeoutError)
        assert now() == 0.5


async def test_min_duration_zero_has_no_deadline_by_default() -> None:
    store = Store(load_delay=1000, save_delay=1000)
    async with store.open(min_duration=0) as processor:
        assert await processor.run("k", Account.deposit, 1) == 1
        assert now() == 2000
    assert store.data == {"k": 1}
