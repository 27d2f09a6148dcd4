"""The in-memory store with fault injection: `memory_store`."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Collection, Hashable, Mapping
from typing import Any, Generic, Literal, Protocol, TypeVar, final

import anyio
import anyio.lowlevel

from keybatch._util import NoPublicConstructor

__all__ = ["Injection", "MemoryStore", "memory_store"]

R = TypeVar("R")


class _Cancellable(Protocol):
    def cancel(self) -> None: ...


@final
class Injection(metaclass=NoPublicConstructor):
    """One fault rule of a `MemoryStore`, returned by `MemoryStore.inject`.

    See [`MemoryStore.inject`][keybatch.testing.MemoryStore.inject].

    Attributes:
        calls: Calls that matched the rule's operation and keys so far.
        fired: Times the rule fired (delayed and/or failed a call).
    """

    __slots__ = (
        "_ops",
        "_keys",
        "_nth",
        "_probability",
        "_when",
        "_times",
        "_latency",
        "_error",
        "_hang",
        "_cancel",
        "calls",
        "fired",
        "active",
    )

    def __init__(
        self,
        ops: frozenset[str],
        keys: frozenset[Hashable] | None,
        nth: frozenset[int] | None,
        probability: float | None,
        when: Callable[[Hashable, int], bool] | None,
        times: int | None,
        latency: float,
        error: Callable[[], BaseException] | None,
        hang: bool,
        cancel: _Cancellable | None,
    ) -> None:
        self._ops = ops
        self._keys = keys
        self._nth = nth
        self._probability = probability
        self._when = when
        self._times = times
        self._latency = latency
        self._error = error
        self._hang = hang
        self._cancel = cancel
        self.calls = 0
        self.fired = 0
        self.active = True

    def remove(self) -> None:
        """Stop applying this rule."""
        self.active = False

    def _fires(self, op: str, key: Hashable, rng: random.Random) -> bool:
        if not self.active or op not in self._ops:
            return False
        if self._keys is not None and key not in self._keys:
            return False
        self.calls += 1
        if self._times is not None and self.fired >= self._times:
            return False
        if self._nth is not None and self.calls not in self._nth:
            return False
        if self._when is not None and not self._when(key, self.calls):
            return False
        if self._probability is not None and rng.random() >= self._probability:
            return False
        self.fired += 1
        return True

    async def _act(self) -> None:
        if self._latency:
            await anyio.sleep(self._latency)
        if self._cancel is not None:
            self._cancel.cancel()
            await anyio.sleep_forever()
        if self._hang:
            await anyio.sleep_forever()
        if self._error is not None:
            raise self._error()


@final
class MemoryStore(Generic[R], metaclass=NoPublicConstructor):
    """Resources kept in a dict, with injectable faults.

    Built by [`memory_store`][keybatch.testing.memory_store]. Pass `store.load`
    and `store.save` to [`keybatch.open_processor`][keybatch.open_processor].
    `load` returns a deep copy of the saved resource (or `initial(key)`) and
    `save` stores a deep copy, so a batch whose save fails leaves no trace.
    Faults fire before the store is read or written.

    Attributes:
        data: The saved resources by key (deep copies of what `save` got).
        loads: Calls to `load` so far.
        saves: Calls to `save` so far.
        failures: Calls that an injected fault failed (raised, hung, cancelled).
    """

    __slots__ = ("data", "loads", "saves", "failures", "_initial", "_rules", "_rng")

    def __init__(
        self,
        initial: Callable[[Hashable], R],
        rng: random.Random,
        data: dict[Hashable, R],
    ) -> None:
        self.data = data
        self.loads = 0
        self.saves = 0
        self.failures = 0
        self._initial = initial
        self._rules: list[Injection] = []
        self._rng = rng

    def __repr__(self) -> str:
        return f"<keybatch.testing.MemoryStore keys={len(self.data)}>"

    def inject(
        self,
        operation: Literal["load", "save", "both"],
        *,
        keys: Hashable | Collection[Hashable] | None = None,
        nth: int | Collection[int] | None = None,
        probability: float | None = None,
        when: Callable[[Hashable, int], bool] | None = None,
        times: int | None = None,
        latency: float = 0.0,
        error: type[BaseException] | Callable[[], BaseException] | None = None,
        hang: bool = False,
        cancel: _Cancellable | None = None,
    ) -> Injection:
        """Add a fault rule; rules are tried in the order they were added.

        A call matches a rule when its operation and key match; the rule fires
        when every trigger given holds: `nth` (the rule's Nth matching call,
        1-based), `probability` (drawn from the store's seeded
        `random.Random`), `when(key, n)` (n: the matching call's
        number), and fewer than `times` firings so far. The first rule that
        fires acts on the call: it sleeps `latency` seconds, then fails the
        call in one way at most, or lets it proceed.

        Args:
            operation: `"load"`, `"save"` or `"both"`.
            keys: A key, or a collection (set, list, tuple) of keys; None: every key.
                A str or bytes is one key.
            nth: A call number or a collection of them.
            probability: Chance in [0, 1] that a matching call fires.
            when: A predicate on `(key, n)`.
            times: Fire at most this many times.
            latency: Seconds to sleep before acting.
            error: An exception class or a zero-argument factory; a fresh
                instance is raised each time.
            hang: Sleep until cancelled: past the batch deadline the processor
                cancels the call (`TimeoutError` cause).
            cancel: Cancel this scope (for example the one around the
                processor), then sleep until cancelled.

        Returns:
            The rule, with counters and
                [`Injection.remove`][keybatch.testing.Injection.remove].

        Raises:
            ValueError: More than one failure kind, a probability outside
                [0, 1], a negative latency, or an unknown operation.
            TypeError: `error` is an exception instance (one instance
                raised many times would be shared by many callers).
        """
        if operation not in ("load", "save", "both"):
            raise ValueError(f"operation must be load, save or both: {operation!r}")
        if sum((error is not None, hang, cancel is not None)) > 1:
            raise ValueError("give at most one of error, hang, cancel")
        if probability is not None and not 0 <= probability <= 1:
            raise ValueError(f"probability must be in [0, 1], got {probability!r}")
        if latency < 0 or math.isnan(latency):
            raise ValueError(f"latency must be >= 0, got {latency!r}")
        if error is not None and not callable(error):
            raise TypeError(
                "error must be an exception class or a factory, so that each"
                f" failure raises its own instance; got {error!r}"
            )
        ops = frozenset(("load", "save") if operation == "both" else (operation,))
        key_set: frozenset[Hashable] | None
        if keys is None:
            key_set = None
        elif isinstance(keys, (str, bytes)) or not isinstance(keys, Collection):
            key_set = frozenset((keys,))
        else:
            key_set = frozenset(keys)
        nth_set = (
            None if nth is None else frozenset((nth,) if isinstance(nth, int) else nth)
        )
        rule: Injection = Injection._create(
            ops,
            key_set,
            nth_set,
            probability,
            when,
            times,
            latency,
            error,
            hang,
            cancel,
        )
        self._rules.append(rule)
        return rule

    def clear_faults(self) -> None:
        """Remove every fault rule."""
        for rule in self._rules:
            rule.active = False
        self._rules.clear()

    async def _fault(self, op: str, key: Hashable) -> None:
        for rule in self._rules:
            if rule._fires(op, key, self._rng):
                try:
                    await rule._act()
                except BaseException:
                    self.failures += 1
                    raise
                if rule._latency:
                    return  # slept: that was the checkpoint
                break
        await anyio.lowlevel.checkpoint()

    async def load(self, key: Hashable) -> R:
        """Return a deep copy of the saved resource of `key`, or `initial(key)`.

        Cancellation: nothing is read or changed; the cancellation propagates.
        """
        self.loads += 1
        await self._fault("load", key)
        if key in self.data:
            return copy.deepcopy(self.data[key])
        return self._initial(key)

    async def save(self, key: Hashable, resource: R) -> None:
        """Store a deep copy of `resource` as the saved state of `key`.

        Cancellation: nothing is written; the cancellation propagates.
        """
        self.saves += 1
        await self._fault("save", key)
        self.data[key] = copy.deepcopy(resource)


def memory_store(
    initial: Callable[[Hashable], R] | None = None,
    *,
    seed: int | None = 0,
    data: Mapping[Hashable, R] | None = None,
) -> MemoryStore[R]:
    """Create an in-memory store for `keybatch.open_processor`.

    Args:
        initial: `initial(key)` gives the resource of a key never saved.
            Default: None for every key. Resources should be deep-copyable and
            comparable with `==` (lists, dicts, dataclasses).
        seed: Seed of the store's `random.Random`, used by
            `probability` faults. None seeds it from the OS.
        data: Resources to start with.

    Example:
        ```python
        store = keybatch.testing.memory_store(lambda key: {"balance": 0})
        store.inject("save", keys="acct:1", nth=2, error=OSError)
        async with keybatch.open_processor(load=store.load, save=store.save) as p:
            ...
        ```
    """
    init: Callable[[Hashable], Any] = initial if initial is not None else _none
    store: MemoryStore[R] = MemoryStore._create(
        init, random.Random(seed), dict(data or {})
    )
    return store


def _none(key: Hashable) -> None:
    return None
