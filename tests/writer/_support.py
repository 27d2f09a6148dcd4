"""Sinks and hooks shared by the writer's tests (anyio, so any backend)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio


class Sink:
    """Records each call (time, key, items); optional delay per key and scripted
    outcomes, consumed in call order (an exception to raise, or a value to return).
    """

    def __init__(
        self,
        delay: float = 0.0,
        script: list[Any] | None = None,
        delays: dict[Any, float] | None = None,
        result: Any = None,
        respond: Callable[[Any, list[Any]], Any] | None = None,
    ) -> None:
        self.delay = delay
        self.delays = delays or {}
        self.script = list(script or [])
        self.result = result
        self.respond = respond
        self.calls: list[tuple[float, Any, list[Any]]] = []
        self.active = 0
        self.max_active = 0

    async def __call__(self, key: Any, items: list[Any]) -> Any:
        self.calls.append((anyio.current_time(), key, list(items)))
        outcome = self.script.pop(0) if self.script else None
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await anyio.sleep(self.delays.get(key, self.delay))
        finally:
            self.active -= 1
        if isinstance(outcome, BaseException):
            raise outcome
        if self.respond is not None:
            return self.respond(key, items)
        return outcome if outcome is not None else self.result

    def written(self) -> list[Any]:
        return [item for _, _, items in self.calls for item in items]

    def times(self, item: Any) -> list[float]:
        return [t for t, _, items in self.calls if item in items]


class Errors:
    """An on_error hook that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, list[Any], BaseException]] = []

    def __call__(self, key: Any, items: list[Any], exc: BaseException) -> None:
        self.calls.append((key, list(items), exc))

    def items(self) -> list[Any]:
        return [item for _, items, _ in self.calls for item in items]
