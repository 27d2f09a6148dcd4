"""The in-memory store with fault injection: `memory_store`."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Collection, Hashable, Mapping
from typing import Any, Generic, Literal, Protocol, TypeVar, final

import anyio
import anyio.lowlevel

import keybatch
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
        "_external",
        "_after",
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
        external: Callable[[Any], Any] | None,
        after: bool,
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
        self._external = external
        self._after = after
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
    Faults fire before the store is read or written, unless a rule says
    `after=True` (the write lands, then the save fails).

    A versioned store (`memory_store(versioned=True)`) keeps a version per key,
    moved by every write. `save` raises [`keybatch.Conflict`][keybatch.Conflict]
    and writes nothing when the key's version moved since the last `load` of it
    (another writer saved first: [`write`][keybatch.testing.MemoryStore.write] or
    an `external=` fault), as a database compare-and-set would. It assumes one
    batch of a key at a time (one processor), as keybatch runs them.

    Attributes:
        data: The saved resources by key (deep copies of what `save` got).
        versions: Each key's version (0 until first written).
        loads: Calls to `load` so far.
        saves: Calls to `save` so far.
        failures: Calls that an injected fault failed (raised, hung, cancelled).
        conflicts: Saves a versioned store refused with `Conflict`.
    """

    __slots__ = (
        "data",
        "versions",
        "loads",
        "saves",
        "failures",
        "conflicts",
        "_initial",
        "_rules",
        "_rng",
        "_versioned",
        "_read",
        "_observers",
    )

    def __init__(
        self,
        initial: Callable[[Hashable], R],
        rng: random.Random,
        data: dict[Hashable, R],
        versioned: bool,
    ) -> None:
        self.data = data
        self.versions: dict[Hashable, int] = {}
        self.loads = 0
        self.saves = 0
        self.failures = 0
        self.conflicts = 0
        self._initial = initial
        self._rules: list[Injection] = []
        self._rng = rng
        self._versioned = versioned
        self._read: dict[Hashable, int] = {}  # key -> version its last load read
        self._observers: list[Callable[[Hashable, Any, bool], None]] = []

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
        external: Callable[[R], R] | None = None,
        after: bool = False,
    ) -> Injection:
        """Add a fault rule; rules are tried in the order they were added.

        A call matches a rule when its operation and key match; the rule fires
        when every trigger given holds: `nth` (the rule's Nth matching call,
        1-based), `probability` (drawn from the store's seeded
        `random.Random`), `when(key, n)` (n: the matching call's
        number), and fewer than `times` firings so far. The first rule that
        fires acts on the call: it sleeps `latency` seconds, makes the
        `external` write if given, then fails the call in one way at most, or
        lets it proceed.

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
            external: Another writer saves first: `external(resource)` gets a
                copy of the stored resource (or `initial(key)`) and returns
                the new one, written as by
                [`write`][keybatch.testing.MemoryStore.write].
                On a versioned store, the save this rule fires on then raises
                `Conflict`.
            after: Fail after the store did its work: a save's write lands,
                then the save raises, hangs or cancels (the write "may have
                landed"; here it did).

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
        if external is not None and not callable(external):
            raise TypeError(f"external must be a callable, got {external!r}")
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
            external,
            after,
        )
        self._rules.append(rule)
        return rule

    def clear_faults(self) -> None:
        """Remove every fault rule."""
        for rule in self._rules:
            rule.active = False
        self._rules.clear()

    def write(self, key: Hashable, resource: R) -> None:
        """Write `resource` as another writer would (outside any processor).

        Stores a deep copy and moves the key's version: on a versioned store,
        a batch of the key that loaded before this write gets `Conflict` when
        it saves.
        """
        self._write(key, resource, True)

    def _write(self, key: Hashable, resource: Any, external: bool) -> None:
        self.data[key] = copy.deepcopy(resource)
        self.versions[key] = version = self.versions.get(key, 0) + 1
        if not external:
            self._read[key] = version  # the writer holds the current version
        for observe in self._observers:
            observe(key, copy.deepcopy(resource), external)

    def _current(self, key: Hashable) -> Any:
        if key in self.data:
            return copy.deepcopy(self.data[key])
        return self._initial(key)

    def _rule_for(self, op: str, key: Hashable) -> Injection | None:
        for rule in self._rules:
            if rule._fires(op, key, self._rng):
                return rule
        return None

    async def _before(self, rule: Injection | None, key: Hashable) -> None:
        """Latency, the external write, and a fault that acts before the work."""
        if rule is None:
            await anyio.lowlevel.checkpoint()
            return
        if rule._latency:
            await anyio.sleep(rule._latency)
        if rule._external is not None:
            self._write(key, rule._external(self._current(key)), True)
        if not rule._after:
            await self._act(rule)  # an error raises here, without a checkpoint
        if not rule._latency:
            await anyio.lowlevel.checkpoint()  # else the sleep was the checkpoint

    async def _act(self, rule: Injection) -> None:
        try:
            await rule._act()
        except BaseException:
            self.failures += 1
            raise

    async def load(self, key: Hashable) -> R:
        """Return a deep copy of the saved resource of `key`, or `initial(key)`.

        Cancellation: nothing is read or changed; the cancellation propagates.
        """
        self.loads += 1
        rule = self._rule_for("load", key)
        await self._before(rule, key)
        resource: R = self._current(key)
        self._read[key] = self.versions.get(key, 0)
        if rule is not None and rule._after:
            await self._act(rule)
        return resource

    async def save(self, key: Hashable, resource: R) -> None:
        """Store a deep copy of `resource` as the saved state of `key`.

        Raises:
            keybatch.Conflict: The store is versioned and the key's version
                moved since its last `load`; nothing is written.

        Cancellation: nothing is written (unless the fault acts `after` the
        write); the cancellation propagates.
        """
        self.saves += 1
        rule = self._rule_for("save", key)
        await self._before(rule, key)
        if self._versioned and self._read.get(key, 0) != self.versions.get(key, 0):
            self.conflicts += 1
            raise keybatch.Conflict(
                f"the version of key {key!r} moved since it was loaded"
            )
        self._write(key, resource, False)
        if rule is not None and rule._after:
            await self._act(rule)


def memory_store(
    initial: Callable[[Hashable], R] | None = None,
    *,
    seed: int | None = 0,
    data: Mapping[Hashable, R] | None = None,
    versioned: bool = False,
) -> MemoryStore[R]:
    """Create an in-memory store for `keybatch.open_processor`.

    Args:
        initial: `initial(key)` gives the resource of a key never saved.
            Default: None for every key. Resources should be deep-copyable and
            comparable with `==` (lists, dicts, dataclasses).
        seed: Seed of the store's `random.Random`, used by
            `probability` faults. None seeds it from the OS.
        data: Resources to start with.
        versioned: Refuse a save with [`keybatch.Conflict`][keybatch.Conflict]
            when the key was written since it was loaded (see
            [`MemoryStore`][keybatch.testing.MemoryStore]).

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
        init, random.Random(seed), dict(data or {}), versioned
    )
    return store


def _none(key: Hashable) -> None:
    return None
