"""`Processor.exclusive`: keyed exclusive sections (issue 11's core feature)."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest

import keybatch


def append(resource: list[Any], value: Any) -> int:
    resource.append(value)
    return len(resource)


class Store:
    def __init__(self) -> None:
        self.data: dict[Any, list[Any]] = {}

    async def load(self, key: Any) -> list[Any]:
        return list(self.data.get(key, []))

    async def save(self, key: Any, value: list[Any]) -> None:
        await anyio.sleep(0.01)
        self.data[key] = value


def opener(store: Store, **options: Any) -> Any:
    options.setdefault("min_duration", 0.1)
    return keybatch.open_processor(load=store.load, save=store.save, **options)


pytestmark = pytest.mark.anyio


async def test_waits_for_earlier_calls_then_holds_and_later_calls_run_after() -> None:
    store = Store()
    async with opener(store) as processor:
        early = [processor.submit("a", append, i) for i in range(3)]
        async with processor.exclusive("a"):
            assert all(p.done() for p in early)
            assert store.data["a"] == [0, 1, 2]
            assert anyio.current_time() == pytest.approx(0.11)
            assert processor.statistics().exclusive_sections == 1
            late = processor.submit("a", append, "late")
            await anyio.sleep(1)  # held: no batch of "a" starts
            assert not late.done()
            assert store.data["a"] == [0, 1, 2]
            store.data["a"].append("in section")
        assert processor.statistics().exclusive_sections == 0
        assert await late.result() == 5
    assert store.data["a"] == [0, 1, 2, "in section", "late"]


async def test_an_idle_key_is_taken_at_once_without_waiting() -> None:
    store = Store()
    async with opener(store) as processor:
        async with processor.exclusive("a", "b", wait=False):
            assert anyio.current_time() == 0.0
            assert processor.statistics().keys == 2
        assert processor.statistics().keys == 0


async def test_wait_false_raises_key_busy_naming_the_busy_keys() -> None:
    store = Store()
    async with opener(store) as processor:
        processor.submit("b", append, 1)
        with pytest.raises(keybatch.KeyBusy) as info:
            async with processor.exclusive("a", "b", "c", wait=False):
                pytest.fail("entered")
        assert info.value.keys == ("b",)
        assert isinstance(info.value, keybatch.KeybatchError)
        # nothing held: "a" and "c" are free
        async with processor.exclusive("a", "c", wait=False):
            pass
    assert store.data == {"b": [1]}


async def test_timeout_raises_key_busy_after_exactly_that_long_holding_nothing() -> (
    None
):
    store = Store()
    async with opener(store, min_duration=1.0) as processor:
        pending = processor.submit("a", append, 1)
        start = anyio.current_time()
        with pytest.raises(keybatch.KeyBusy) as info:
            async with processor.exclusive("a", "b", timeout=0.25):
                pytest.fail("entered")
        assert anyio.current_time() - start == 0.25
        assert info.value.keys == ("a",)
        assert processor.statistics().exclusive_sections == 0
        assert await pending.result() == 1
        assert anyio.current_time() == pytest.approx(1.01)
        # the section's place in "a"'s queue is gone: later calls are not held
        assert await processor.run("a", append, 2) == 2


async def test_sections_on_shared_keys_in_any_order_do_not_deadlock() -> None:
    store = Store()
    order: list[str] = []

    async def section(name: str, *keys: str) -> None:
        async with processor.exclusive(*keys):
            order.append(f"{name} in")
            await anyio.sleep(0.5)
            order.append(f"{name} out")

    async with opener(store) as processor:
        processor.submit("a", append, 1)
        processor.submit("b", append, 1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(section, "first", "a", "b")
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(section, "second", "b", "a")
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(section, "third", "a")
    names = ["first", "second", "third"]
    assert order == [f"{name} {step}" for name in names for step in ("in", "out")]


@pytest.mark.parametrize("where", ["waiting", "holding"])
async def test_cancelling_a_section_releases_its_keys(where: str) -> None:
    store = Store()
    async with opener(store) as processor:
        if where == "waiting":
            processor.submit("a", append, 0)
        with anyio.move_on_after(0.05 if where == "waiting" else 0.5):
            async with processor.exclusive("a"):
                assert where == "holding"
                await anyio.sleep_forever()
        assert processor.statistics().exclusive_sections == 0
        assert await processor.run("a", append, "after") >= 1
    assert store.data["a"][-1] == "after"


async def test_a_graceful_stop_waits_for_a_held_section() -> None:
    store = Store()
    released = anyio.Event()

    async def hold() -> None:
        async with processor.exclusive("a"):
            await anyio.sleep(2)
        released.set()

    async with anyio.create_task_group() as tg:
        async with opener(store) as processor:
            tg.start_soon(hold)
            await anyio.wait_all_tasks_blocked()
            queued = processor.submit("a", append, "queued while held")
        # the block's stop waited for the section, then ran what queued behind it
        assert released.is_set()
        assert anyio.current_time() == pytest.approx(2.01)
        assert await queued.result() == 1
    assert store.data == {"a": ["queued while held"]}


async def test_teardown_fails_a_waiting_section_with_processor_stopped() -> None:
    store = Store()
    outcome: list[Any] = []

    async def wait_for_section() -> None:
        try:
            async with processor.exclusive("a"):
                outcome.append("entered")
        except keybatch.ProcessorStopped:
            outcome.append("stopped")

    async with anyio.create_task_group() as outer:
        with anyio.CancelScope() as scope:
            async with opener(store) as processor:
                processor.submit("a", append, 1)
                outer.start_soon(wait_for_section)
                await anyio.sleep(0.05)
                scope.cancel()
                await anyio.lowlevel.checkpoint()
    assert outcome == ["stopped"]
    assert processor.statistics().keys == 0


async def test_exclusive_needs_a_key_and_routes_it_like_run() -> None:
    async with keybatch.open_processor(min_duration=0) as processor:
        with pytest.raises(TypeError):
            async with processor.exclusive():
                pass
        with pytest.raises(TypeError):
            async with processor.exclusive(42):
                pass
    with pytest.raises(keybatch.ProcessorStopped):
        async with processor.exclusive("a"):
            pass


async def test_a_call_waiting_for_room_makes_its_key_busy_and_counts_for_timeout() -> (
    None
):
    store = Store()
    async with opener(store, max_pending=1) as processor:
        processor.submit("a", append, "first")  # takes the only room
        async with anyio.create_task_group() as tg:
            tg.start_soon(processor.run, "a", append, "waiting for room")
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(keybatch.KeyBusy) as info:
                async with processor.exclusive("a", "b", wait=False):
                    pytest.fail("entered")
            assert info.value.keys == ("a",)
            start = anyio.current_time()
            with pytest.raises(keybatch.KeyBusy):
                async with processor.exclusive("a", timeout=0.05):
                    pytest.fail("entered")
            assert anyio.current_time() - start == pytest.approx(0.05)
            # a key nobody waits on is not held up by the queue for room
            async with processor.exclusive("b", wait=False):
                pass
            async with processor.exclusive("a"):
                assert store.data["a"] == ["first", "waiting for room"]
