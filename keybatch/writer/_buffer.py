"""The resource of one flush: a buffer of items, and the operations that fill it.

One batch of the processor is one flush: its load makes a fresh buffer, each
accepted item is an operation that appends to it, and its save calls the sink.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

__all__ = ["Buffer", "Entry", "append", "append_id", "append_sync", "new_buffer"]


class Buffer:
    """The resource of one flush: its items, and the ids among them."""

    __slots__ = ("items", "ids", "attempts")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.ids: list[Hashable] = []
        self.attempts = 0


class Entry:
    """A write_sync item: whether it entered a flush, and which one."""

    __slots__ = ("buffer",)

    def __init__(self) -> None:
        self.buffer: Buffer | None = None


async def new_buffer(key: Hashable) -> Buffer:
    """The processor's load: every flush starts with an empty buffer."""
    return Buffer()


def append(buffer: Buffer, item: Any) -> None:
    """The operation of an item without an id."""
    buffer.items.append(item)


def append_id(buffer: Buffer, item: Any, id: Hashable) -> None:
    """The operation of an item with an id (later items may wait for it)."""
    buffer.items.append(item)
    buffer.ids.append(id)


def append_sync(buffer: Buffer, item: Any, id: Hashable, entry: Entry) -> None:
    """The operation of a write_sync item: `entry` records its flush."""
    entry.buffer = buffer
    buffer.items.append(item)
    if id is not None:
        buffer.ids.append(id)
