"""Data sources shared by the loader's tests (anyio, so any backend)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio


class Source:
    """A batch_load recording each call (time, ids): the value of id n is 10 * n;
    ids in ``missing`` are left out, ids in ``errors`` map to an exception;
    optional delay and scripted failures (consumed in call order)."""

    def __init__(
        self,
        delay: float = 0.0,
        missing: Any = (),
        errors: Any = (),
        failures: list[BaseException | None] | None = None,
    ) -> None:
        self.delay = delay
        self.missing = missing
        self.errors = errors
        self.failures = list(failures or [])
        self.calls: list[tuple[float, list[Any]]] = []
        self.active = 0
        self.max_active = 0

    async def __call__(self, ids: list[Any]) -> Mapping[Any, Any]:
        self.calls.append((anyio.current_time(), list(ids)))
        exc = self.failures.pop(0) if self.failures else None
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await anyio.sleep(self.delay)
        finally:
            self.active -= 1
        if exc is not None:
            raise exc
        return {
            i: LookupError(f"no row {i}") if i in self.errors else 10 * i
            for i in ids
            if i not in self.missing
        }


async def gather(fn: Any, args: list[Any]) -> list[Any]:
    """Call ``fn(arg)`` for each arg in its own task, all in the same tick; return
    the outcomes (value or exception) in order."""
    out: list[Any] = [None] * len(args)

    async def one(i: int, arg: Any) -> None:
        try:
            out[i] = await fn(arg)
        except Exception as exc:
            out[i] = exc

    async with anyio.create_task_group() as tg:
        for i, arg in enumerate(args):
            tg.start_soon(one, i, arg)
    return out
