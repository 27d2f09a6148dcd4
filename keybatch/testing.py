"""Testing code that uses keybatch: a faulty store, a history checker, virtual time.

* :func:`memory_store` keeps resources in memory and injects latency and
  failures into ``load`` and ``save`` (per key, by seeded probability, on the
  Nth call, or by a predicate; an exception, a hang past the batch deadline, or
  a cancellation).
* :func:`recorder` logs every call, application, outcome, load and save, and
  :meth:`Recorder.check` verifies the log: operations of a key applied in call
  order, each at most once, batches of a key never overlapping, every reported
  success saved, and the saved state equal to applying the committed operations
  one by one.
* :func:`run_autojump`, :func:`assert_elapsed` and the ``virtual_clock`` pytest
  fixture run tests in trio's virtual time.

Built on keybatch's public API only.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import math
import random
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Hashable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import (
    Any,
    Concatenate,
    Generic,
    Literal,
    ParamSpec,
    Protocol,
    TypeVar,
    final,
)

import anyio
import anyio.lowlevel
import trio
import trio.testing

import keybatch
from keybatch._util import NoPublicConstructor

__all__ = [
    "Event",
    "HistoryViolation",
    "Injection",
    "MemoryStore",
    "Recorder",
    "assert_elapsed",
    "check_history",
    "memory_store",
    "recorder",
    "run_autojump",
]

R = TypeVar("R")
T = TypeVar("T")
P = ParamSpec("P")


class _Cancellable(Protocol):
    def cancel(self) -> None: ...


# ---------------------------------------------------------------------------
# The store


@final
class Injection(metaclass=NoPublicConstructor):
    """One fault rule of a :class:`MemoryStore`, returned by :meth:`MemoryStore.inject`.

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
    """Resources kept in a dict, with injectable faults; built by :func:`memory_store`.

    Pass ``store.load`` and ``store.save`` to :func:`keybatch.open_processor`.
    ``load`` returns a deep copy of the saved resource (or ``initial(key)``) and
    ``save`` stores a deep copy, so a batch whose save fails leaves no trace.
    Faults fire before the store is read or written.

    Attributes:
        data: The saved resources by key (deep copies of what ``save`` got).
        loads: Calls to ``load`` so far.
        saves: Calls to ``save`` so far.
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
        when every trigger given holds: ``nth`` (the rule's Nth matching call,
        1-based), ``probability`` (drawn from the store's seeded
        :class:`random.Random`), ``when(key, n)`` (n: the matching call's
        number), and fewer than ``times`` firings so far. The first rule that
        fires acts on the call: it sleeps ``latency`` seconds, then fails the
        call in one way at most, or lets it proceed.

        Args:
            operation: ``"load"``, ``"save"`` or ``"both"``.
            keys: A key, or a collection (set, list, tuple) of keys; None: every key.
                A str or bytes is one key.
            nth: A call number or a collection of them.
            probability: Chance in [0, 1] that a matching call fires.
            when: A predicate on ``(key, n)``.
            times: Fire at most this many times.
            latency: Seconds to sleep before acting.
            error: An exception class or a zero-argument factory; a fresh
                instance is raised each time.
            hang: Sleep until cancelled: past the batch deadline the processor
                cancels the call (``TimeoutError`` cause).
            cancel: Cancel this scope (for example the one around the
                processor), then sleep until cancelled.

        Returns:
            The rule, with counters and :meth:`Injection.remove`.

        Raises:
            ValueError: More than one failure kind, a probability outside
                [0, 1], a negative latency, or an unknown operation.
            TypeError: ``error`` is an exception instance (one instance
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
        """Return a deep copy of the saved resource of ``key``, or ``initial(key)``.

        Cancellation: nothing is read or changed; the cancellation propagates.
        """
        self.loads += 1
        await self._fault("load", key)
        if key in self.data:
            return copy.deepcopy(self.data[key])
        return self._initial(key)

    async def save(self, key: Hashable, resource: R) -> None:
        """Store a deep copy of ``resource`` as the saved state of ``key``.

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
    """Create an in-memory store for :func:`keybatch.open_processor`.

    Args:
        initial: ``initial(key)`` gives the resource of a key never saved.
            Default: None for every key. Resources should be deep-copyable and
            comparable with ``==`` (lists, dicts, dataclasses).
        seed: Seed of the store's :class:`random.Random`, used by
            ``probability`` faults. None seeds it from the OS.
        data: Resources to start with.

    Example::

        store = keybatch.testing.memory_store(lambda key: {"balance": 0})
        store.inject("save", keys="acct:1", nth=2, error=OSError)
        async with keybatch.open_processor(load=store.load, save=store.save) as p:
            ...
    """
    init: Callable[[Hashable], Any] = initial if initial is not None else _none
    store: MemoryStore[R] = MemoryStore._create(
        init, random.Random(seed), dict(data or {})
    )
    return store


def _none(key: Hashable) -> None:
    return None


# ---------------------------------------------------------------------------
# The history


CALL = "call"  # an op was passed to run/submit; data: (op, args, kwargs, how)
APPLY = "apply"  # the operation ran; data: its value, error: what it raised
OUTCOME = "outcome"  # its caller got: data (value), or error
LOAD = "load"  # load(key) started
LOADED = "loaded"  # load returned; data: a deep copy of the resource
LOAD_FAILED = "load_failed"  # load raised or was cancelled; error
SAVE = "save"  # save(key, resource) started; data: a deep copy of the resource
SAVED = "saved"  # save returned
SAVE_FAILED = "save_failed"  # save raised or was cancelled; error


@dataclass(frozen=True)
class Event:
    """One entry of a :class:`Recorder`'s log.

    Attributes:
        index: Position in the log (0-based).
        key: The key concerned.
        kind: One of ``call``, ``apply``, ``outcome``, ``load``, ``loaded``,
            ``load_failed``, ``save``, ``saved``, ``save_failed``.
        op: The operation's number (its index in call order), for ``call``,
            ``apply`` and ``outcome``; else None.
        data: ``call``: ``(op, args, kwargs, how)``, ``how`` being ``"run"``,
            ``"submit"`` or ``"wrap"`` (for which the outcome is never
            logged, and ``args``/``kwargs`` only once applied); ``apply`` and
            ``outcome``: the
            value; ``loaded`` and ``save``: a deep copy of the resource.
        error: The exception of ``apply``, ``outcome``, ``load_failed`` and
            ``save_failed``, or None.
    """

    index: int
    key: Hashable
    kind: str
    op: int | None = None
    data: Any = None
    error: BaseException | None = field(default=None, repr=False)


class HistoryViolation(AssertionError):
    """The history broke a keybatch guarantee; ``problems`` lists each finding."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__(
            f"{len(problems)} violation(s):\n  " + "\n  ".join(problems[:20])
        )
        self.problems = list(problems)


@final
class Recorder(metaclass=NoPublicConstructor):
    """Logs calls, applications, outcomes, loads and saves; built by :func:`recorder`.

    Route operations through :meth:`run`/:meth:`submit` (or pass
    :meth:`wrap`'s result to ``processor.run``) and give the processor
    :meth:`wrap_load`/:meth:`wrap_save` of your store; then :meth:`check`.

    Attributes:
        events: The log, in the order things happened.
    """

    __slots__ = ("events", "_ops", "_unobserved")

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._ops = 0
        self._unobserved: dict[int, keybatch.Pending[Any]] = {}

    def __repr__(self) -> str:
        return f"<keybatch.testing.Recorder events={len(self.events)} ops={self._ops}>"

    def _log(
        self,
        key: Hashable,
        kind: str,
        op: int | None = None,
        data: Any = None,
        error: BaseException | None = None,
    ) -> None:
        events = self.events
        events.append(Event(len(events), key, kind, op, data, error))

    def wrap(
        self, key: Hashable, op: Callable[Concatenate[R, P], T]
    ) -> Callable[Concatenate[R, P], T]:
        """Log a call of ``op`` on ``key`` now; return an op that logs its application.

        Call it in the same expression as ``run``/``submit`` (no checkpoint in
        between) so the log keeps call order::

            await processor.run(key, recorder.wrap(key, deposit), 10)

        The outcome is not logged this way; :meth:`run` and :meth:`submit` log it.
        """
        n = self._ops
        self._ops += 1
        self._log(key, CALL, n, (op, (), {}, "wrap"))
        index = len(self.events) - 1
        return self._applier(key, n, op, index)

    def _applier(
        self, key: Hashable, n: int, op: Callable[..., Any], index: int
    ) -> Callable[..., Any]:
        events = self.events

        def applied(resource: Any, /, *args: Any, **kwargs: Any) -> Any:
            call = events[index]
            if call.data[3] == "wrap" and (args or kwargs):  # args known now
                events[index] = Event(index, key, CALL, n, (op, args, kwargs, "wrap"))
            try:
                value = op(resource, *args, **kwargs)
            except BaseException as exc:
                self._log(key, APPLY, n, None, exc)
                raise
            self._log(key, APPLY, n, value)
            return value

        applied.__name__ = getattr(op, "__name__", "op")
        applied.__qualname__ = getattr(op, "__qualname__", applied.__name__)
        return applied

    def _call(
        self,
        key: Hashable,
        op: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        how: str,
    ) -> tuple[int, Callable[..., Any]]:
        n = self._ops
        self._ops += 1
        self._log(key, CALL, n, (op, args, kwargs, how))
        if _is_async(op):
            return n, op  # let the processor refuse it at the call site
        return n, self._applier(key, n, op, len(self.events) - 1)

    async def run(
        self,
        processor: keybatch.Processor[R],
        key: Hashable,
        op: Callable[Concatenate[R, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``op`` through ``processor.run``, logging call, application and outcome.

        Cancellation: as :meth:`keybatch.Processor.run`; the cancellation is
        logged as the outcome and re-raised.
        """
        n, wrapped = self._call(key, op, args, kwargs, "run")
        try:
            value: T = await processor.run(key, wrapped, *args, **kwargs)
        except BaseException as exc:
            self._log(key, OUTCOME, n, None, exc)
            raise
        self._log(key, OUTCOME, n, value)
        return value

    def submit(
        self,
        processor: keybatch.Processor[R],
        key: Hashable,
        op: Callable[Concatenate[R, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> keybatch.Pending[T]:
        """Submit ``op`` through ``processor.submit``, logging call and application.

        The outcome is logged by :meth:`result` or :meth:`collect`. An error
        raised at the call (``Overloaded``, ``ProcessorStopped``, ...) is logged
        as the outcome and re-raised.
        """
        n, wrapped = self._call(key, op, args, kwargs, "submit")
        try:
            pending = processor.submit(key, wrapped, *args, **kwargs)
        except BaseException as exc:
            self._log(key, OUTCOME, n, None, exc)
            raise
        self._unobserved[n] = pending
        return pending

    async def result(self, pending: keybatch.Pending[T]) -> T:
        """``await pending.result()`` for a :meth:`submit`-ted operation, logging it.

        Cancellation: nothing is logged; the operation stays queued (as
        :meth:`keybatch.Pending.result`).
        """
        for n, p in self._unobserved.items():  # noqa: B007
            if p is pending:
                break
        else:
            return await pending.result()
        key = self._key_of(n)
        try:
            value = await pending.result()
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise
            del self._unobserved[n]
            self._log(key, OUTCOME, n, None, exc)
            raise
        del self._unobserved[n]
        self._log(key, OUTCOME, n, value)
        return value

    async def collect(self) -> None:
        """Log the outcome of every submitted operation that is done and not logged yet.

        Call it after the processor stopped, before :meth:`check` with
        ``complete=True``.

        Cancellation: stops collecting; what was logged stays.
        """
        await anyio.lowlevel.checkpoint()
        for pending in list(self._unobserved.values()):
            if pending.done():
                try:
                    await self.result(pending)
                except BaseException as exc:
                    if isinstance(exc, anyio.get_cancelled_exc_class()):
                        raise

    def _key_of(self, n: int) -> Hashable:
        for event in self.events:
            if event.op == n and event.kind == CALL:
                return event.key
        raise LookupError(n)  # pragma: no cover

    def wrap_load(
        self, load: Callable[[Hashable], Awaitable[R]]
    ) -> Callable[[Hashable], Awaitable[R]]:
        """Return a load function that logs ``load``'s start, result or failure."""

        async def recorded_load(key: Hashable) -> R:
            self._log(key, LOAD)
            try:
                resource = await load(key)
            except BaseException as exc:
                self._log(key, LOAD_FAILED, error=exc)
                raise
            self._log(key, LOADED, data=copy.deepcopy(resource))
            return resource

        return recorded_load

    def wrap_save(
        self, save: Callable[[Hashable, R], Awaitable[object]]
    ) -> Callable[[Hashable, R], Awaitable[None]]:
        """Return a save function that logs ``save``'s start (with a copy) and end."""

        async def recorded_save(key: Hashable, resource: R) -> None:
            self._log(key, SAVE, data=copy.deepcopy(resource))
            try:
                await save(key, resource)
            except BaseException as exc:
                self._log(key, SAVE_FAILED, error=exc)
                raise
            self._log(key, SAVED)

        return recorded_save

    def pending_unobserved(self) -> int:
        """Return how many submitted operations have no logged outcome."""
        return len(self._unobserved)

    def check(
        self, saved: Mapping[Hashable, Any] | None = None, *, complete: bool = False
    ) -> None:
        """Verify the log; raise :class:`HistoryViolation` listing what is wrong.

        See :func:`check_history`. With ``complete=True`` (the processor has
        stopped and :meth:`collect` ran), every submitted operation must be done.
        """
        problems = _check(self.events, saved, complete)
        if complete:
            for n, pending in self._unobserved.items():
                if not pending.done():
                    problems.append(f"op {n}: submitted, never finished (lost)")
        if problems:
            raise HistoryViolation(problems)


def recorder() -> Recorder:
    """Create an empty :class:`Recorder`.

    Example::

        rec = keybatch.testing.recorder()
        store = keybatch.testing.memory_store(lambda key: [])
        async with keybatch.open_processor(
            load=rec.wrap_load(store.load), save=rec.wrap_save(store.save)
        ) as processor:
            await rec.run(processor, "k", list.append, 1)
        rec.check(store.data, complete=True)
    """
    rec: Recorder = Recorder._create()
    return rec


def check_history(
    events: Sequence[Event],
    saved: Mapping[Hashable, Any] | None = None,
    *,
    complete: bool = False,
) -> None:
    """Verify a log of calls, applications, outcomes, loads and saves.

    Per key, it checks that:

    * loads and saves never overlap (one batch at a time), and operations are
      applied only between a successful load and the batch's save;
    * operations are applied in the order they were called, each at most once;
    * a caller that got a value had its operation applied in a batch that was
      saved, and got the value the application returned; a caller that got
      ``LoadError`` or ``ProcessorStopped`` had its operation never applied; a
      caller that got ``SaveError`` had it applied in a batch whose save
      failed; a caller that got another exception got the one its operation
      raised; no exception instance reached two callers;
    * every save wrote what replaying the batch's operations on the loaded
      resource gives (operations must be deterministic), and every load
      returned the last state saved;
    * ``saved`` (the store's final contents), if given, holds the last state
      saved for every key that was saved;
    * with ``complete``: every batch that applied an operation successfully
      ended with a save, and every operation has an outcome or was applied.

    Raises:
        HistoryViolation: One or more guarantees were broken.
    """
    problems = _check(events, saved, complete)
    if problems:
        raise HistoryViolation(problems)


@dataclass
class _Batch:
    loaded: Any
    applied: list[int] = field(default_factory=list)
    saving: Any = None
    end: str = "open"  # open, saving, saved, save_failed


@dataclass
class _Key:
    phase: str = "idle"  # idle, loading, open, saving
    batch: _Batch | None = None
    last_saved: Any = None
    has_saved: bool = False
    last_applied_op: int = -1


_WHAT = {"loading": "load", "saving": "save"}
_NOT_APPLIED_OK = (keybatch.ProcessorStopped, keybatch.Overloaded, keybatch.LoadError)
_CALL_SITE = (TypeError, ValueError, RuntimeError)


def _check(
    events: Sequence[Event], saved: Mapping[Hashable, Any] | None, complete: bool
) -> list[str]:
    problems: list[str] = []
    keys: dict[Hashable, _Key] = {}
    calls: dict[int, Event] = {}
    applies: dict[int, Event] = {}
    batch_of: dict[int, _Batch] = {}
    outcomes: dict[int, Event] = {}
    cancelled = (trio.Cancelled, asyncio.CancelledError)

    def end_open_batch(k: Hashable, ks: _Key) -> None:
        batch = ks.batch
        if batch is None:
            return
        ok = [n for n in batch.applied if applies[n].error is None]
        if ok:
            problems.append(
                f"key {k!r}: ops {ok} were applied successfully but their batch"
                " was never saved"
            )
        batch.end = "unsaved"

    for ev in events:
        k = ev.key
        ks = keys.setdefault(k, _Key())
        kind = ev.kind
        if kind == CALL:
            assert ev.op is not None
            calls[ev.op] = ev
        elif kind == LOAD:
            if ks.phase in ("loading", "saving"):
                problems.append(
                    f"key {k!r}: a load started at event {ev.index} while a"
                    f" {_WHAT[ks.phase]} of the key was in flight (batches overlap)"
                )
            elif ks.phase == "open":
                end_open_batch(k, ks)
            ks.phase = "loading"
            ks.batch = None
        elif kind == LOADED:
            if ks.phase != "loading":
                problems.append(f"key {k!r}: load returned at {ev.index} unasked")
            if ks.has_saved and ev.data != ks.last_saved:
                problems.append(
                    f"key {k!r}: load at event {ev.index} returned {ev.data!r},"
                    f" not the last state saved {ks.last_saved!r}"
                )
            ks.phase = "open"
            ks.batch = _Batch(ev.data)
        elif kind == LOAD_FAILED:
            ks.phase = "idle"
            ks.batch = None
        elif kind == APPLY:
            n = ev.op
            assert n is not None
            if n in applies:
                problems.append(f"key {k!r}: op {n} applied twice")
                continue
            applies[n] = ev
            call = calls.get(n)
            if call is None or call.key != k:
                problems.append(f"key {k!r}: op {n} applied without a call on key")
            if ks.phase != "open" or ks.batch is None:
                problems.append(
                    f"key {k!r}: op {n} applied at event {ev.index} outside a"
                    f" loaded batch (phase {ks.phase})"
                )
            else:
                ks.batch.applied.append(n)
                batch_of[n] = ks.batch
            if n < ks.last_applied_op:
                problems.append(
                    f"key {k!r}: op {n} applied after op {ks.last_applied_op},"
                    " against call order"
                )
            ks.last_applied_op = max(ks.last_applied_op, n)
        elif kind == SAVE:
            if ks.phase != "open" or ks.batch is None:
                problems.append(
                    f"key {k!r}: a save started at event {ev.index} outside a"
                    f" loaded batch (phase {ks.phase})"
                )
                ks.batch = _Batch(None)
            ks.phase = "saving"
            ks.batch.saving = ev.data
            ks.batch.end = "saving"
            _replay(k, ks.batch, calls, applies, ev.data, problems)
        elif kind in (SAVED, SAVE_FAILED):
            if ks.phase != "saving" or ks.batch is None:
                problems.append(f"key {k!r}: save ended at {ev.index} unasked")
            else:
                ks.batch.end = "saved" if kind == SAVED else "save_failed"
                if kind == SAVED:
                    ks.last_saved = ks.batch.saving
                    ks.has_saved = True
            ks.phase = "idle"
            ks.batch = None
        elif kind == OUTCOME:
            assert ev.op is not None
            if ev.op in outcomes:
                problems.append(f"op {ev.op}: two outcomes")
            outcomes[ev.op] = ev
        else:
            problems.append(f"event {ev.index}: unknown kind {kind!r}")

    if complete:
        for k, ks in keys.items():
            if ks.phase in ("loading", "saving"):
                problems.append(f"key {k!r}: a {_WHAT[ks.phase]} never ended")
            elif ks.phase == "open":
                end_open_batch(k, ks)

    # Outcomes against applications.
    seen_errors: dict[int, int] = {}
    for n, out in outcomes.items():
        err = out.error
        app = applies.get(n)
        batch = batch_of.get(n)
        end = batch.end if batch is not None else None
        if err is None:
            if app is None:
                problems.append(f"op {n}: caller got {out.data!r}, never applied")
            elif app.error is not None:
                problems.append(f"op {n}: caller got a value, but the op raised")
            elif app.data is not out.data and app.data != out.data:
                problems.append(
                    f"op {n}: caller got {out.data!r}, the op returned {app.data!r}"
                )
            elif end != "saved":
                problems.append(
                    f"op {n}: caller got a value but its batch ended {end!r}"
                    " (reported successful, not saved)"
                )
            continue
        if isinstance(err, cancelled):
            continue
        if isinstance(err, keybatch.KeybatchError):
            other = seen_errors.setdefault(id(err), n)
            if other != n:
                problems.append(
                    f"ops {other} and {n}: one exception instance reached both callers"
                )
        if isinstance(err, keybatch.BatchError) and err.key != out.key:
            problems.append(f"op {n}: {type(err).__name__} names key {err.key!r}")
        if isinstance(err, keybatch.SaveError):
            if app is None or end not in ("save_failed", "saving"):
                problems.append(
                    f"op {n}: caller got SaveError but the op was"
                    f" {'never applied' if app is None else f'in a batch {end}'}"
                )
        elif isinstance(err, _NOT_APPLIED_OK):
            if app is not None:
                problems.append(
                    f"op {n}: caller got {type(err).__name__} but the op was applied"
                )
        elif app is not None:
            if app.error is not err:
                problems.append(
                    f"op {n}: caller got {err!r}, the op raised {app.error!r}"
                )
        elif not isinstance(err, _CALL_SITE):
            problems.append(f"op {n}: caller got {err!r} but the op was never applied")

    if complete:
        for n, call in calls.items():
            if n not in outcomes and n not in applies and call.data[3] != "wrap":
                problems.append(
                    f"op {n} on key {call.key!r}: no outcome and never applied (lost)"
                )

    if saved is not None:
        for k, ks in keys.items():
            if ks.has_saved and (k not in saved or saved[k] != ks.last_saved):
                problems.append(
                    f"key {k!r}: the store holds {saved.get(k)!r}, the last save"
                    f" wrote {ks.last_saved!r}"
                )
    return problems


def _replay(
    key: Hashable,
    batch: _Batch,
    calls: Mapping[int, Event],
    applies: Mapping[int, Event],
    saving: Any,
    problems: list[str],
) -> None:
    state = copy.deepcopy(batch.loaded)
    for n in batch.applied:
        op, args, kwargs, _ = calls[n].data
        app = applies[n]
        try:
            value = op(state, *args, **kwargs)
        except BaseException as exc:
            if app.error is None or type(app.error) is not type(exc):
                problems.append(
                    f"key {key!r}: op {n} raised {exc!r} on replay, {app.error!r}"
                    " when applied"
                )
            continue
        if app.error is not None:
            problems.append(f"key {key!r}: op {n} raised when applied, not on replay")
        elif value != app.data:
            problems.append(
                f"key {key!r}: op {n} returned {app.data!r}, {value!r} on replay"
            )
    if state != saving:
        problems.append(
            f"key {key!r}: save wrote {saving!r}; replaying ops {batch.applied}"
            f" on the loaded {batch.loaded!r} gives {state!r}"
        )


def _is_async(op: object) -> bool:
    if inspect.iscoroutinefunction(op) or inspect.isasyncgenfunction(op):
        return True
    return callable(op) and inspect.iscoroutinefunction(type(op).__call__)


# ---------------------------------------------------------------------------
# Virtual time


def run_autojump(
    async_fn: Callable[..., Awaitable[T]],
    *args: Any,
    clock: trio.testing.MockClock | None = None,
) -> T:
    """Run ``async_fn(*args)`` with :func:`trio.run` under an autojump ``MockClock``.

    Time is virtual: it starts at 0 and jumps to the next deadline whenever
    every task is blocked, so a test of a 10-minute scenario takes
    milliseconds and time assertions are exact.

    Args:
        async_fn: The async function to run.
        args: Its positional arguments.
        clock: A clock to use instead of ``MockClock(autojump_threshold=0)``.
    """
    if clock is None:
        clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(async_fn, *args, clock=clock)


@contextmanager
def assert_elapsed(seconds: float, *, tolerance: float = 1e-9) -> Iterator[None]:
    """Assert that the block takes exactly ``seconds`` of event-loop time.

    Meant for virtual time (trio's ``MockClock``), where durations are exact::

        with keybatch.testing.assert_elapsed(0.1):
            await processor.run("k", op)

    Raises:
        AssertionError: The block took another time (checked only when the
            block did not raise).
    """
    start = anyio.current_time()
    yield
    elapsed = anyio.current_time() - start
    if not math.isclose(elapsed, seconds, rel_tol=0.0, abs_tol=tolerance):
        raise AssertionError(f"the block took {elapsed!r}s, expected {seconds!r}s")


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only a test dependency
    pass
else:

    @pytest.fixture
    def virtual_clock() -> trio.testing.MockClock:
        """pytest fixture: an autojump ``MockClock`` for pytest-trio tests.

        Import it into a ``conftest.py`` (``from keybatch.testing import
        virtual_clock``) and request it in a ``@pytest.mark.trio`` test.
        """
        return trio.testing.MockClock(autojump_threshold=0)
