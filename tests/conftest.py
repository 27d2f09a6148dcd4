"""Shared fixtures.

Trio is the reference backend: tests are marked ``pytest.mark.trio`` (pytest-trio)
and take ``autojump_clock`` to run in virtual time. The asyncio subset is marked
``pytest.mark.anyio`` and uses the ``anyio_backend`` fixture below; modules that
want asyncio in virtual time override it with :func:`asyncio_autojump_backend`.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any

import pytest


class _AutojumpSelector(selectors.DefaultSelector):
    """A selector that jumps a virtual clock instead of sleeping until a timer.

    When the loop would wait for a timer and no I/O is ready, the clock jumps to
    the timer at once, like trio's ``MockClock(autojump_threshold=0)``. With no
    timer pending it blocks on real I/O (threads waking the loop still work).
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[Any]:
        events = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            return super().select(None)
        self.now += timeout
        return []


class AutojumpLoop(asyncio.SelectorEventLoop):
    """An asyncio event loop on a virtual clock that autojumps (see above)."""

    def __init__(self) -> None:
        self._autojump = _AutojumpSelector()
        super().__init__(self._autojump)

    def time(self) -> float:
        return self._autojump.now


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def asyncio_autojump_backend() -> tuple[str, dict[str, Any]]:
    """Backend spec for anyio's plugin: asyncio on :class:`AutojumpLoop`."""
    return "asyncio", {"loop_factory": AutojumpLoop}
