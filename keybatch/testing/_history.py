"""The log of a `Recorder` and its checker: `check_history`."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

import keybatch

__all__ = [
    "APPLY",
    "CALL",
    "EXTERNAL",
    "HELD",
    "LOAD",
    "LOADED",
    "LOAD_FAILED",
    "OUTCOME",
    "RELEASED",
    "SAVE",
    "SAVED",
    "SAVE_FAILED",
    "SECTION",
    "WRITE",
    "Event",
    "HistoryViolation",
    "check_history",
]

CALL = "call"  # an op was passed to run/submit; data: (op, args, kwargs, how)
APPLY = "apply"  # the operation ran; data: its value, error: what it raised
OUTCOME = "outcome"  # its caller got: data (value), or error
LOAD = "load"  # load(key) started
LOADED = "loaded"  # load returned; data: a deep copy of the resource
LOAD_FAILED = "load_failed"  # load raised or was cancelled; error
SAVE = "save"  # save(key, resource) started; data: a deep copy of the resource
SAVED = "saved"  # save returned
SAVE_FAILED = "save_failed"  # save raised or was cancelled; error
WRITE = "write"  # a watched store wrote a save; data: a deep copy of what it wrote
EXTERNAL = "external"  # another writer wrote the watched store; data: likewise
SECTION = "section"  # exclusive(*keys) was called; one event per key
HELD = "held"  # the section holds the key (its block was entered)
RELEASED = "released"  # the section's block exited: the key is free


@dataclass(frozen=True)
class Event:
    """One entry of a [`Recorder`][keybatch.testing.Recorder]'s log.

    Attributes:
        index: Position in the log (0-based).
        key: The key concerned.
        kind: One of `call`, `apply`, `outcome`, `load`, `loaded`,
            `load_failed`, `save`, `saved`, `save_failed`, `write`,
            `external`, `section`, `held`, `released`.
        op: The operation's number (its index in call order), for `call`,
            `apply` and `outcome`; the section's number (from the same
            sequence) for `section`, `held`, `released` and its `outcome`;
            else None.
        data: `call`: `(op, args, kwargs, how)`, `how` being `"run"`,
            `"submit"` or `"wrap"` (for which the outcome is never
            logged, and `args`/`kwargs` only once applied); `apply` and
            `outcome`: the value; `loaded`, `save`, `write` and `external`:
            a deep copy of the resource; `section`: `(keys, wait, timeout)`.
        error: The exception of `apply`, `outcome`, `load_failed` and
            `save_failed`, or None.
    """

    index: int
    key: Hashable
    kind: str
    op: int | None = None
    data: Any = None
    error: BaseException | None = field(default=None, repr=False)


class HistoryViolation(AssertionError):
    """The history broke a keybatch guarantee; `problems` lists each finding."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__(
            f"{len(problems)} violation(s):\n  " + "\n  ".join(problems[:20])
        )
        self.problems = list(problems)


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
    * operations are applied in the order they were called, each at most once,
      except that a batch whose save raised `keybatch.Conflict` may be
      replayed: loaded again and the same operations applied again, in the
      same order (each replay is checked like a batch);
    * a caller that got a value had its operation applied in a batch that was
      saved, and got the value its last application returned; a caller that got
      `LoadError`, `ProcessorStopped` or `Overloaded` had its operation never
      applied (or, for `LoadError`, only in a batch whose save raised
      `Conflict` and whose reload failed); a caller that got `SaveError` had it
      applied in a batch whose save failed, and `may_have_landed=False` only if
      the store refused the save with `Conflict` and wrote nothing; a caller
      that got another exception got the one its operation raised; no
      exception instance reached two callers;
    * every save wrote what replaying the batch's operations on the loaded
      resource gives (operations must be deterministic), and every load
      returned the state last stored;
    * exclusive sections: a section takes a key only when no batch of it is in
      flight; no batch of the key runs while it holds it; operations called
      before the section are never applied once it took the key, and the ones
      called after it only once it ended;
    * `saved` (the store's final contents), if given, holds the state last
      stored for every key that was stored;
    * with `complete`: every batch that applied an operation successfully
      ended with a save, every operation called through `run` or `submit`
      has exactly one outcome (for `wrap`, whose outcome is never logged:
      nothing), and every section has an outcome and was released.

    What was stored is known from `saved` events, or, when the log has
    `write` or `external` events (a store watched by
    [`Recorder.watch`][keybatch.testing.Recorder.watch]), from those: then a
    save that failed after its write landed counts as stored, and writes by
    another writer are part of the state.

    Raises:
        HistoryViolation: One or more guarantees were broken.
    """
    problems = _check(events, saved, complete)
    if problems:
        raise HistoryViolation(problems)


@dataclass
class _Batch:
    loaded: Any = None
    applied: list[int] = field(default_factory=list)
    apps: list[Event] = field(default_factory=list)  # APPLY events, in order
    saving: Any = None
    # open, saving, saved, save_failed, conflict (refused), unsaved
    end: str = "open"
    wrote: bool = False  # the store wrote this batch's save
    after_conflict: _Batch | None = None  # the refused batch it may replay
    replay_of: _Batch | None = None  # the refused batch it replays
    reload_failed: bool = False  # refused, and the load after it failed


@dataclass
class _Key:
    phase: str = "idle"  # idle, loading, open, saving, held
    batch: _Batch | None = None
    stored: Any = None
    has_stored: bool = False
    last_applied_op: int = -1
    conflicted: _Batch | None = None  # refused with Conflict; may be replayed
    held_by: int | None = None
    sections: dict[int, str] = field(default_factory=dict)  # waiting/held/ended
    ever_held: set[int] = field(default_factory=set)


_WHAT = {"loading": "load", "saving": "save"}
_NOT_APPLIED_OK = (
    keybatch.ProcessorStopped,
    keybatch.Overloaded,
    keybatch.LoadError,
    keybatch.KeyBusy,
)
_CALL_SITE = (TypeError, ValueError, RuntimeError)
_CANCELLED = (trio.Cancelled, asyncio.CancelledError)


def _check(
    events: Sequence[Event], saved: Mapping[Hashable, Any] | None, complete: bool
) -> list[str]:
    problems: list[str] = []
    keys: dict[Hashable, _Key] = {}
    calls: dict[int, Event] = {}
    sections: dict[int, list[Hashable]] = {}  # section number -> its keys
    section_outcome: dict[int, Event] = {}
    applies: dict[int, list[Event]] = {}
    batch_of: dict[int, _Batch] = {}  # op -> the batch of its last application
    outcomes: dict[int, Event] = {}
    writes = any(ev.kind in (WRITE, EXTERNAL) for ev in events)

    def end_open_batch(k: Hashable, ks: _Key) -> None:
        batch = ks.batch
        if batch is None:
            return
        ok = [ev.op for ev in batch.apps if ev.error is None]
        if ok:
            problems.append(
                f"key {k!r}: ops {ok} were applied successfully but their batch"
                " was never saved"
            )
        batch.end = "unsaved"

    def store(ks: _Key, data: Any) -> None:
        ks.stored = data
        ks.has_stored = True

    for ev in events:
        k = ev.key
        kind = ev.kind
        n: int | None
        if kind == OUTCOME and ev.op in sections:
            n = ev.op
            assert n is not None
            if n in section_outcome:
                problems.append(f"section {n}: two outcomes")
            section_outcome[n] = ev
            if ev.error is not None:
                for sk in sections[n]:
                    sks = keys.setdefault(sk, _Key())
                    if sks.sections.get(n) == "waiting":
                        sks.sections[n] = "ended"
            continue
        ks = keys.setdefault(k, _Key())
        if kind == CALL:
            assert ev.op is not None
            calls[ev.op] = ev
        elif kind == SECTION:
            assert ev.op is not None
            sections.setdefault(ev.op, []).append(k)
            ks.sections[ev.op] = "waiting"
        elif kind == HELD:
            n = ev.op
            assert n is not None
            if ks.phase in ("loading", "saving"):
                problems.append(
                    f"key {k!r}: section {n} took the key at event {ev.index}"
                    f" while a {_WHAT[ks.phase]} of it was in flight"
                )
            elif ks.phase == "held":
                problems.append(
                    f"key {k!r}: section {n} took the key at event {ev.index}"
                    f" while section {ks.held_by} held it"
                )
            elif ks.phase == "open":
                end_open_batch(k, ks)
            ks.phase = "held"
            ks.batch = None
            ks.held_by = n
            ks.sections[n] = "held"
            ks.ever_held.add(n)
        elif kind == RELEASED:
            if ks.held_by != ev.op:
                problems.append(
                    f"key {k!r}: section {ev.op} released the key at event"
                    f" {ev.index} without holding it"
                )
            else:
                ks.phase = "idle"
                ks.held_by = None
            ks.sections[ev.op] = "ended"  # type: ignore[index]
        elif kind == LOAD:
            if ks.phase in ("loading", "saving"):
                problems.append(
                    f"key {k!r}: a load started at event {ev.index} while a"
                    f" {_WHAT[ks.phase]} of the key was in flight (batches overlap)"
                )
            elif ks.phase == "held":
                problems.append(
                    f"key {k!r}: a load started at event {ev.index} while"
                    f" section {ks.held_by} held the key"
                )
            elif ks.phase == "open":
                end_open_batch(k, ks)
            ks.phase = "loading"
            ks.batch = _Batch(after_conflict=ks.conflicted)
            ks.conflicted = None
        elif kind == LOADED:
            if ks.phase != "loading" or ks.batch is None:
                problems.append(f"key {k!r}: load returned at {ev.index} unasked")
                ks.batch = _Batch()
            if ks.has_stored and ev.data != ks.stored:
                problems.append(
                    f"key {k!r}: load at event {ev.index} returned {ev.data!r},"
                    f" not the last state {'stored' if writes else 'saved'}"
                    f" {ks.stored!r}"
                )
            ks.phase = "open"
            ks.batch.loaded = ev.data
        elif kind == LOAD_FAILED:
            if ks.batch is not None and ks.batch.after_conflict is not None:
                ks.batch.after_conflict.reload_failed = True
            ks.phase = "idle"
            ks.batch = None
        elif kind == APPLY:
            _apply_event(ev, ks, calls, applies, batch_of, problems)
        elif kind == SAVE:
            if ks.phase != "open" or ks.batch is None:
                problems.append(
                    f"key {k!r}: a save started at event {ev.index} outside a"
                    f" loaded batch (phase {ks.phase})"
                )
                ks.batch = _Batch()
            batch = ks.batch
            ks.phase = "saving"
            batch.saving = ev.data
            batch.end = "saving"
            replayed = batch.replay_of
            if replayed is not None and batch.applied != replayed.applied:
                problems.append(
                    f"key {k!r}: a replay applied ops {batch.applied}, but the"
                    f" batch it replays applied {replayed.applied}"
                )
            _replay(k, batch, calls, ev.data, problems)
        elif kind == WRITE:
            if ks.phase != "saving" or ks.batch is None:
                problems.append(
                    f"key {k!r}: the store wrote at event {ev.index} outside a save"
                )
            else:
                ks.batch.wrote = True
                if ev.data != ks.batch.saving:
                    problems.append(
                        f"key {k!r}: the store wrote {ev.data!r}, the save was"
                        f" given {ks.batch.saving!r}"
                    )
            store(ks, ev.data)
        elif kind == EXTERNAL:
            store(ks, ev.data)
        elif kind in (SAVED, SAVE_FAILED):
            if ks.phase != "saving" or ks.batch is None:
                problems.append(f"key {k!r}: save ended at {ev.index} unasked")
            else:
                batch = ks.batch
                if kind == SAVED:
                    batch.end = "saved"
                    if not writes:
                        store(ks, batch.saving)
                    elif not batch.wrote:
                        problems.append(
                            f"key {k!r}: the save that ended at event {ev.index}"
                            " returned, but the store wrote nothing"
                        )
                elif isinstance(ev.error, keybatch.Conflict):
                    batch.end = "conflict"
                    ks.conflicted = batch
                    if batch.wrote:
                        problems.append(
                            f"key {k!r}: the store raised Conflict at event"
                            f" {ev.index} after writing"
                        )
                else:
                    batch.end = "save_failed"
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
            elif ks.phase == "held":
                problems.append(f"key {k!r}: section {ks.held_by} never released it")

    _check_outcomes(outcomes, applies, batch_of, problems)

    if complete:
        for n, call in calls.items():
            if n not in outcomes and call.data[3] != "wrap":  # wrap: no outcome
                problems.append(
                    f"op {n} on key {call.key!r}: no outcome"
                    + (" and never applied (lost)" if n not in applies else "")
                )
        for n, skeys in sections.items():
            if n not in section_outcome:
                problems.append(f"section {n} on keys {skeys!r}: no outcome")

    if saved is not None:
        for k, ks in keys.items():
            if ks.has_stored and (k not in saved or saved[k] != ks.stored):
                problems.append(
                    f"key {k!r}: the store holds {saved.get(k)!r}, the last"
                    f" {'write' if writes else 'save'} wrote {ks.stored!r}"
                )
    return problems


def _apply_event(
    ev: Event,
    ks: _Key,
    calls: Mapping[int, Event],
    applies: dict[int, list[Event]],
    batch_of: dict[int, _Batch],
    problems: list[str],
) -> None:
    k = ev.key
    n = ev.op
    assert n is not None
    call = calls.get(n)
    if call is None or call.key != k:
        problems.append(f"key {k!r}: op {n} applied without a call on key")
    batch = ks.batch
    if ks.phase != "open" or batch is None:
        problems.append(
            f"key {k!r}: op {n} applied at event {ev.index} outside a"
            f" loaded batch (phase {ks.phase})"
        )
        return
    for s, state in ks.sections.items():
        if s < n and state != "ended":
            problems.append(
                f"key {k!r}: op {n} applied at event {ev.index} before section"
                f" {s}, called before it, ended"
            )
        elif s > n and s in ks.ever_held:
            problems.append(
                f"key {k!r}: op {n} applied at event {ev.index} after section"
                f" {s}, called after it, took the key"
            )
    before = applies.get(n)
    if before is not None:
        previous = batch_of[n]
        if (
            batch.replay_of is None
            and not batch.applied
            and batch.after_conflict is previous
        ):
            batch.replay_of = previous
        if batch.replay_of is previous:
            position = len(batch.applied)
            expected = previous.applied
            if position >= len(expected) or expected[position] != n:
                problems.append(
                    f"key {k!r}: a replay applied op {n} at position {position};"
                    f" the batch it replays applied {expected}"
                )
        else:
            problems.append(f"key {k!r}: op {n} applied twice")
            return
        before.append(ev)
    else:
        if batch.replay_of is not None:
            problems.append(
                f"key {k!r}: a replay applied op {n}, which the batch it replays"
                " did not apply"
            )
        batch.after_conflict = None  # a new batch: the refused one is over
        if n < ks.last_applied_op:
            problems.append(
                f"key {k!r}: op {n} applied after op {ks.last_applied_op},"
                " against call order"
            )
        ks.last_applied_op = max(ks.last_applied_op, n)
        applies[n] = [ev]
    batch.applied.append(n)
    batch.apps.append(ev)
    batch_of[n] = batch


def _check_outcomes(
    outcomes: Mapping[int, Event],
    applies: Mapping[int, list[Event]],
    batch_of: Mapping[int, _Batch],
    problems: list[str],
) -> None:
    seen_errors: dict[int, int] = {}
    for n, out in outcomes.items():
        err = out.error
        apps = applies.get(n)
        app = apps[-1] if apps else None  # the application that counts
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
        if isinstance(err, _CANCELLED):
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
            if app is None or end not in ("save_failed", "saving", "conflict"):
                problems.append(
                    f"op {n}: caller got SaveError but the op was"
                    f" {'never applied' if app is None else f'in a batch {end}'}"
                )
            elif not err.may_have_landed and (end != "conflict" or batch.wrote):  # type: ignore[union-attr]
                problems.append(
                    f"op {n}: caller got SaveError(may_have_landed=False), but"
                    + (
                        " the store wrote its batch"
                        if batch.wrote  # type: ignore[union-attr]
                        else f" its batch's save ended {end!r}, not refused by Conflict"
                    )
                )
            elif err.may_have_landed and end == "conflict":
                problems.append(
                    f"op {n}: caller got SaveError(may_have_landed=True), but the"
                    " store refused its batch with Conflict (nothing landed)"
                )
        elif isinstance(err, keybatch.LoadError) and app is not None:
            if not (end == "conflict" and batch.reload_failed):  # type: ignore[union-attr]
                problems.append(
                    f"op {n}: caller got LoadError but the op was applied"
                    " (and its batch was not refused and reloaded)"
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


def _replay(
    key: Hashable,
    batch: _Batch,
    calls: Mapping[int, Event],
    saving: Any,
    problems: list[str],
) -> None:
    state = copy.deepcopy(batch.loaded)
    for app in batch.apps:
        n = app.op
        assert n is not None
        if n not in calls:
            continue
        op, args, kwargs, _ = calls[n].data
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
