"""What the core's behaviour tests share: resources, stores, callers, virtual time.

Every helper works on every backend of ``tests/conftest.py`` (trio on an autojump
``MockClock``, asyncio on the virtual-time ``AutojumpLoop``), through anyio. The
tests in ``tests/semantics/`` import from here and define no store, resource or
caller of their own.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import anyio
import anyio.lowlevel

import keybatch
from keybatch import testing as kt

__all__ = [
    "Account",
    "Harness",
    "Store",
    "append",
    "cancelled_exc",
    "checked_append",
    "double_last",
    "jump",
    "kt",
    "list_store",
    "now",
    "opener",
    "outcome_of",
    "settle",
    "still_works",
    "worker_task_names",
]


# --------------------------------------------------------------------------- resources


class Account:
    """A balance; `deposit` returns the new one, so callers see the order."""

    def __init__(self, balance: int = 0) -> None:
        self.balance = balance

    def deposit(self, amount: int) -> int:
        self.balance += amount
        return self.balance


def append(resource: list[Any], x: Any) -> int:
    """Append `x`; return the list's new length."""
    resource.append(x)
    return len(resource)


def checked_append(resource: list[Any], x: int) -> int:
    """Append `x`, refusing negative numbers with a ValueError."""
    if x < 0:
        raise ValueError(f"negative: {x}")
    resource.append(x)
    return len(resource)


def double_last(resource: list[Any]) -> int:
    """Double the last element (order-sensitive); return the sum."""
    if resource:
        resource[-1] *= 2
    return sum(resource)


# --------------------------------------------------------------------------- stores


class Store:
    """Accounts in memory; logs each load and save with its virtual time.

    `load_delay` and `save_delay` are virtual seconds slept in each call; a save
    that is cut off (deadline, cancellation) writes nothing.
    """

    def __init__(self, load_delay: float = 0.0, save_delay: float = 0.0) -> None:
        self.data: dict[Hashable, int] = {}
        self.loads: list[tuple[float, Hashable]] = []
        self.saves: list[tuple[float, Hashable, int]] = []
        self.load_delay = load_delay
        self.save_delay = save_delay

    async def load(self, key: Hashable) -> Account:
        self.loads.append((now(), key))
        if self.load_delay:
            await anyio.sleep(self.load_delay)
        return Account(self.data.get(key, 0))

    async def save(self, key: Hashable, account: Account) -> None:
        if self.save_delay:
            await anyio.sleep(self.save_delay)
        self.saves.append((now(), key, account.balance))
        self.data[key] = account.balance

    def open(self, **options: Any) -> Any:
        """`open_processor` on this store's load and save."""
        return keybatch.open_processor(load=self.load, save=self.save, **options)


def opener(store: kt.MemoryStore[Any], **options: Any) -> Any:
    """`open_processor` on a `keybatch.testing` memory store: 0.1 s windows, 4
    workers unless given."""
    options.setdefault("min_duration", 0.1)
    options.setdefault("workers", 4)
    return keybatch.open_processor(load=store.load, save=store.save, **options)


def list_store(**options: Any) -> kt.MemoryStore[list[Any]]:
    """A `keybatch.testing` memory store of lists (empty for a new key)."""
    return kt.memory_store(lambda key: [], **options)


class Harness:
    """A recorded memory store of lists, its reports, and callers that keep
    their outcome instead of raising into the task group.

    `check()` runs the history checker of `keybatch.testing` on the whole log:
    per key, call order kept, each operation applied at most once, batches never
    overlapping, every success saved, the saved state equal to the committed
    operations applied one by one, and (complete) every operation finished.
    """

    def __init__(self, **store_options: Any) -> None:
        self.store: kt.MemoryStore[list[Any]] = list_store(**store_options)
        self.rec = kt.recorder()
        self.reports: list[keybatch.BatchReport] = []
        self.results: dict[int, Any] = {}

    def open(self, **options: Any) -> Any:
        options.setdefault("min_duration", 0.1)
        options.setdefault("workers", 2)
        return keybatch.open_processor(
            load=self.rec.wrap_load(self.store.load),
            save=self.rec.wrap_save(self.store.save),
            on_batch=self.reports.append,
            **options,
        )

    async def call(
        self,
        processor: keybatch.Processor[Any],
        tag: int,
        key: Hashable,
        op: Callable[..., Any],
        *args: Any,
    ) -> None:
        """`results[tag]` = the recorded run's value or exception; a
        cancellation is kept and re-raised."""
        try:
            self.results[tag] = await self.rec.run(processor, key, op, *args)
        except BaseException as exc:
            self.results[tag] = exc
            if isinstance(exc, cancelled_exc()):
                raise
            if not isinstance(exc, Exception):  # pragma: no cover - a test bug
                raise

    def batches(self, key: Hashable) -> list[int]:
        return [r.operations for r in self.reports if r.key == key]

    async def check(self) -> None:
        await self.rec.collect()
        self.rec.check(self.store.data, complete=True)


async def still_works(
    processor: keybatch.Processor[Any], *keys: Any, rec: kt.Recorder | None = None
) -> None:
    """Each key given, and a fresh one, still gets an operation applied and
    saved; nothing is left pending."""
    for key in (*keys, "bystander"):
        before = processor.statistics()
        if rec is None:
            assert await processor.run(key, append, "ok") >= 1
        else:
            assert await rec.run(processor, key, append, "ok") >= 1
        after = processor.statistics()
        assert after.operations_done == before.operations_done + 1
    assert processor.statistics().pending_operations == 0


# --------------------------------------------------------------------------- callers


async def outcome_of(fn: Callable[[], Awaitable[Any]]) -> Any:
    """What `await fn()` returned, or the exception it raised."""
    try:
        return await fn()
    except BaseException as exc:
        return exc


def cancelled_exc() -> type[BaseException]:
    """The running backend's cancellation exception class."""
    return anyio.get_cancelled_exc_class()


# --------------------------------------------------------------------------- time


def now() -> float:
    """The event loop's (virtual) clock."""
    return anyio.current_time()


def _running_trio() -> bool:
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def jump(seconds: float) -> None:
    """Move the virtual clock forward by `seconds` at once, as if the code that
    calls it ran that long (a slow operation or hook)."""
    if _running_trio():
        import trio

        trio.lowlevel.current_clock().jump(seconds)  # type: ignore[attr-defined]
        return
    loop: Any = asyncio.get_running_loop()
    loop._autojump.now += seconds  # conftest.AutojumpLoop's clock


async def settle() -> None:
    """Return once every other task is blocked, without moving the clock.

    trio: `trio.testing.wait_all_tasks_blocked()`. asyncio: yield until the
    loop has nothing ready to run and no timer due now (anyio's own
    `wait_all_tasks_blocked` sleeps 0.1 s, which virtual time would count).
    """
    if _running_trio():
        import trio.testing

        await trio.testing.wait_all_tasks_blocked()
        return
    loop: Any = asyncio.get_running_loop()
    if not hasattr(loop, "_ready"):  # uvloop: no view of its queue; yield a lot
        for _ in range(100):
            await asyncio.sleep(0)
        return
    for _ in range(10_000):
        await asyncio.sleep(0)
        ready, scheduled = loop._ready, loop._scheduled
        if not ready and not (scheduled and scheduled[0].when() <= loop.time()):
            return
    raise AssertionError("tasks kept running: nothing settled")  # pragma: no cover


def worker_task_names() -> list[str]:
    """Names of the live tasks of keybatch's workers, on the running backend."""
    if _running_trio():
        import trio

        names = []
        todo = [trio.lowlevel.current_root_task()]
        while todo:
            task = todo.pop()
            names.append(task.name)
            for nursery in task.child_nurseries:
                todo.extend(nursery.child_tasks)
    else:
        names = [t.get_name() for t in asyncio.all_tasks() if not t.done()]
    return sorted(n for n in names if "keybatch worker" in n)
