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
    "LOAD",
    "LOADED",
    "LOAD_FAILED",
    "OUTCOME",
    "SAVE",
    "SAVED",
    "SAVE_FAILED",
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


@dataclass(frozen=True)
class Event:
    """One entry of a [`Recorder`][keybatch.testing.Recorder]'s log.

    Attributes:
        index: Position in the log (0-based).
        key: The key concerned.
        kind: One of `call`, `apply`, `outcome`, `load`, `loaded`,
            `load_failed`, `save`, `saved`, `save_failed`.
        op: The operation's number (its index in call order), for `call`,
            `apply` and `outcome`; else None.
        data: `call`: `(op, args, kwargs, how)`, `how` being `"run"`,
            `"submit"` or `"wrap"` (for which the outcome is never
            logged, and `args`/`kwargs` only once applied); `apply` and
            `outcome`: the
            value; `loaded` and `save`: a deep copy of the resource.
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
    * operations are applied in the order they were called, each at most once;
    * a caller that got a value had its operation applied in a batch that was
      saved, and got the value the application returned; a caller that got
      `LoadError` or `ProcessorStopped` had its operation never applied; a
      caller that got `SaveError` had it applied in a batch whose save
      failed; a caller that got another exception got the one its operation
      raised; no exception instance reached two callers;
    * every save wrote what replaying the batch's operations on the loaded
      resource gives (operations must be deterministic), and every load
      returned the last state saved;
    * `saved` (the store's final contents), if given, holds the last state
      saved for every key that was saved;
    * with `complete`: every batch that applied an operation successfully
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
