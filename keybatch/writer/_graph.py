"""Dependencies between items, as a plain object that returns decisions.

The graph knows the ids of the items accepted and not written yet, the items
held until the ids in their ``after=`` are written, and (up to a bound) the ids
that failed. It changes nothing else: each method returns what the writer must
do (buffer these items, fail those because of that id), and the writer does it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from typing import NamedTuple

from ._entry import Entry

__all__ = ["HELD_BACK", "DependencyGraph", "Doomed", "dependency_message"]


class Doomed(NamedTuple):
    """A decision: ``entry`` fails, because ``dependency`` was not written."""

    entry: Entry
    dependency: Hashable
    reason: str  # why the dependency was not written, "failed to flush (...)"


HELD_BACK = "held"  # the verdict of add() for an item that must wait


def dependency_message(id: Hashable, dependency: Hashable, reason: str) -> str:
    """The message of a [`DependencyFailed`][keybatch.writer.DependencyFailed]."""
    what = "the item" if id is None else f"item {id!r}"
    return f"{what} was not written: it waited for {dependency!r}, which {reason}"


class DependencyGraph:
    """The ids and held items of one writer. Not thread-safe, like the writer."""

    __slots__ = ("_pending", "_failed", "_max_failed", "held")

    def __init__(self, max_failed_ids: int) -> None:
        # id of an item accepted and not written yet -> the items held on it
        self._pending: dict[Hashable, list[Entry]] = {}
        # ids that were not written -> why; the oldest are forgotten past the bound
        self._failed: dict[Hashable, str] = {}
        self._max_failed = max_failed_ids
        self.held: dict[int, Entry] = {}  # by seq: in acceptance order

    def check(self, id: Hashable, after: Iterable[Hashable]) -> tuple[Hashable, ...]:
        """Validate an item's ``id`` and ``after``; return ``after`` as a tuple.

        Changes nothing, so the writer can check before it waits for room.

        Raises:
            TypeError: ``after`` is a str or bytes (one id, or its letters?) or
                not iterable, or holds None or an unhashable id; ``id`` is not
                hashable.
            ValueError: ``id`` is already buffered, or ``after`` names it.
        """
        if isinstance(after, (str, bytes, bytearray, memoryview)):
            raise TypeError(
                f"after must be a collection of ids, not {type(after).__name__}:"
                f" write after=[{after!r}] for one id"
            )
        try:
            deps = tuple(after)
        except TypeError:
            raise TypeError(
                f"after must be a collection of ids, got {type(after).__name__}"
            ) from None
        for dep in deps:
            if dep is None:
                raise TypeError("after cannot hold None (None means: no id)")
            hash(dep)
        if id is not None:
            hash(id)
            if id in self._pending:
                raise ValueError(f"id {id!r} is already buffered")
            if id in deps:
                raise ValueError(f"item {id!r} cannot be written after itself")
        return deps

    def add(self, entry: Entry, deps: tuple[Hashable, ...]) -> Doomed | str | None:
        """Take an entry checked by :meth:`check`.

        Returns:
            None: buffer it now. ``HELD_BACK``: it waits (the graph holds it
            until :meth:`written` releases it). A ``Doomed``: an id it names
            failed, so it fails now (its own id is marked failed too).
        """
        id = entry.id
        if id is not None:
            self._failed.pop(id, None)  # written again: no longer failed
            self._pending[id] = []
        if not deps:
            return None
        failed = self._failed
        for dep in deps:
            reason = failed.get(dep)
            if reason is not None:
                if id is not None:
                    del self._pending[id]
                    self._mark_failed(id, f"was not written (it waited for {dep!r})")
                return Doomed(entry, dep, reason)
        pending = self._pending
        missing = 0
        for dep in dict.fromkeys(deps):  # each id once
            dependents = pending.get(dep)
            if dependents is not None:
                dependents.append(entry)
                missing += 1
        if not missing:
            return None
        entry.missing = missing
        self.held[entry.seq] = entry
        return HELD_BACK

    def written(self, ids: Iterable[Hashable]) -> list[Entry]:
        """These ids were written: return the held entries to buffer now."""
        released = []
        pending = self._pending
        held = self.held
        for id in ids:
            for entry in pending.pop(id, ()):
                if entry.seq in held:
                    entry.missing -= 1
                    if entry.missing == 0:
                        del held[entry.seq]
                        released.append(entry)
        return released

    def failed(self, reasons: Iterable[tuple[Hashable, str]]) -> list[Doomed]:
        """These ids were not written (and why): return the held entries that
        fail with them, transitively, in the order they should be reported."""
        doomed = []
        todo = deque(reasons)
        pending = self._pending
        held = self.held
        while todo:
            id, reason = todo.popleft()
            self._mark_failed(id, reason)
            for entry in pending.pop(id, ()):
                if held.pop(entry.seq, None) is None:
                    continue  # failed already, through another id
                doomed.append(Doomed(entry, id, reason))
                if entry.id is not None:
                    # Not nested further: a long chain keeps short messages.
                    todo.append((entry.id, f"was not written (it waited for {id!r})"))
        return doomed

    def withdraw(self, entry: Entry, reason: str) -> list[Doomed]:
        """An accepted entry will not be written after all (its write_sync was
        cancelled): forget it; return what fails with its id."""
        self.held.pop(entry.seq, None)
        if entry.id is None:
            return []
        return self.failed([(entry.id, reason)])

    def forget(self, ids: Iterable[Hashable]) -> None:
        """The writer stops: these ids are neither pending nor failed any more."""
        for id in ids:
            self._pending.pop(id, None)

    def drop_held(self) -> list[Entry]:
        """The writer stops: return every held entry, and hold none."""
        dropped = list(self.held.values())
        self.held.clear()
        for entry in dropped:
            if entry.id is not None:
                self._pending.pop(entry.id, None)
        return dropped

    def _mark_failed(self, id: Hashable, reason: str) -> None:
        failed = self._failed
        failed.pop(id, None)  # the newest failure goes last
        failed[id] = reason
        if len(failed) > self._max_failed:
            del failed[next(iter(failed))]  # forget the oldest
