"""Dependencies between items: an item written `after=` others waits for them.

An item whose dependencies are not written yet is *held*; it is buffered once
the last of them was flushed successfully, and fails (with `DependencyFailed`) as
soon as one of them fails. Failure is transitive: the items held on a failed
item's own id fail too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING, Any

import anyio

import keybatch

from ._buffer import append, append_id
from ._errors import DependencyFailed

if TYPE_CHECKING:
    from ._writer import Writer

__all__ = ["TORN_DOWN", "Dependencies", "Held", "dependency_message"]

TORN_DOWN = object()  # held.failed_on[0] of items dropped by a teardown


class Held:
    """An item waiting for the items named in its `after=`."""

    __slots__ = ("key", "item", "id", "seq", "missing", "done", "event", "failed_on")

    def __init__(self, key: Hashable, item: Any, id: Hashable, seq: int) -> None:
        self.key = key
        self.item = item
        self.id = id
        self.seq = seq
        self.missing = 0  # dependencies not written yet
        self.done = False  # released, failed or withdrawn
        self.event: Any = None  # set for a write_sync caller
        self.failed_on: tuple[Hashable, str] | None = None  # (dependency, reason)


def dependency_message(id: Hashable, dependency: Hashable, reason: str) -> str:
    """The message of a [`DependencyFailed`][keybatch.writer.DependencyFailed]."""
    what = "the item" if id is None else f"item {id!r}"
    return f"{what} was not written: it waited for {dependency!r}, which {reason}"


class Dependencies:
    """The items of one writer written with an `id` or `after=`.

    It owns the ids and the held items; the item counts, the room and the hooks
    it updates belong to its writer.
    """

    __slots__ = (
        "_writer",
        "pending_ids",
        "failed_ids",
        "held",
        "held_seq",
        "released",
        "releasing",
    )

    def __init__(self, writer: Writer[Any]) -> None:
        self._writer = writer
        # ids of items accepted and not written yet -> items held on them
        self.pending_ids: dict[Hashable, list[Held] | None] = {}
        self.failed_ids: dict[Hashable, str] = {}  # id -> why it was not written
        self.held: dict[int, Held] = {}
        self.held_seq = 0
        self.released = 0
        self.releasing = 0  # released write_sync items not enqueued yet

    def accept(
        self,
        key: Hashable,
        item: Any,
        id: Hashable,
        after: Iterable[Hashable],
        sync: bool,
    ) -> Held | None:
        """Accept an item with an id or dependencies.

        write/write_nowait: submitted, held, or failed at once (on_error).
        write_sync: returns the Held to wait on, or None when the caller may
        enqueue at once (it registers the id and counts the item itself).
        """
        hash(key)  # unhashable keys fail now, not when a held item is released
        writer = self._writer
        deps = list(after)
        if id is not None:
            if id in self.pending_ids:
                raise ValueError(f"id {id!r} is already buffered")
            if id in deps:
                raise ValueError(f"item {id!r} cannot be written after itself")
        failed = next((d for d in deps if d in self.failed_ids), None)
        waiting = [d for d in deps if d in self.pending_ids]
        if failed is None and not waiting:
            if sync:
                return None
            if id is None:
                writer._proc.submit(key, append, item)
            else:
                writer._proc.submit(key, append_id, item, id)
                self.register(id)
            writer._buffered += 1
            return None
        self.held_seq += 1
        held = Held(key, item, id, self.held_seq)
        if sync:
            held.event = anyio.Event()
        writer._buffered += 1
        if id is not None:
            self.register(id)
        self.held[held.seq] = held
        if failed is not None:
            self.fail_held(held, failed, self.failed_ids[failed])
            return held
        pending = self.pending_ids
        for dep in waiting:
            dependents = pending[dep]
            if dependents is None:
                pending[dep] = dependents = []
            dependents.append(held)
            held.missing += 1
        return held

    def register(self, id: Hashable) -> None:
        if id in self.pending_ids:
            raise ValueError(f"id {id!r} is already buffered")
        self.failed_ids.pop(id, None)
        self.pending_ids[id] = None

    def unhold(self, held: Held) -> None:
        held.done = True
        del self.held[held.seq]

    def written_ids(self, ids: list[Hashable]) -> None:
        """The items with these ids were written: release what waited for them."""
        pending = self.pending_ids
        for id in ids:
            for held in pending.pop(id, None) or ():
                if not held.done:
                    held.missing -= 1
                    if held.missing == 0:
                        self.release(held)

    def release(self, held: Held) -> None:
        """Every dependency of a held item was written: buffer it."""
        self.unhold(held)
        self.released += 1
        if held.event is not None:
            self.releasing += 1
            held.event.set()  # the write_sync caller enqueues it
            return
        writer = self._writer
        try:
            if held.id is None:
                writer._proc.submit(held.key, append, held.item)
            else:
                writer._proc.submit(held.key, append_id, held.item, held.id)
        except keybatch.ProcessorStopped:  # torn down meanwhile
            writer._dropped += 1
            writer._withdraw(held.id, "the writer was torn down before it was flushed")

    def fail_held(self, held: Held, dependency: Hashable, reason: str) -> None:
        self.fail_ids([], [(held, dependency, reason)])

    def fail_ids(
        self,
        ids: list[tuple[Hashable, str]],
        helds: list[tuple[Held, Hashable, str]] | None = None,
    ) -> None:
        """Mark ids as not written and fail, transitively, the items held on them."""
        todo = deque(ids)  # first in, first out: on_error sees them in order
        stack = deque(helds or ())
        pending = self.pending_ids
        writer = self._writer
        while True:
            while todo:
                id, reason = todo.popleft()
                self.failed_ids[id] = reason
                for held in pending.pop(id, None) or ():
                    if not held.done:
                        stack.append((held, id, reason))
            if not stack:
                return
            held, dependency, reason = stack.popleft()
            if held.done:
                continue
            self.unhold(held)
            held.failed_on = (dependency, reason)
            writer._buffered -= 1
            writer._failed_items += 1
            writer._room.release(1)
            if held.id is not None:
                # Not nested further: a long chain keeps short messages.
                todo.append(
                    (held.id, f"was not written (it waited for {dependency!r})")
                )
            if held.event is not None:
                held.event.set()
            if writer._on_error is not None:
                error = DependencyFailed(
                    held.key,
                    dependency_message(held.id, dependency, reason),
                    dependency,
                )
                writer._call_hook(writer._on_error, held.key, [held.item], error)

    def drop_held(self) -> None:
        """The writer was torn down: every held item fails with ProcessorStopped."""
        for held in list(self.held.values()):
            self.unhold(held)
            held.failed_on = (TORN_DOWN, "the writer was torn down")
            if held.event is not None:
                held.event.set()
