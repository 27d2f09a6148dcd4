"""Shared fixtures: every behaviour test runs on each backend, in virtual time.

A test marked ``pytest.mark.anyio`` (anyio's pytest plugin) gets the ``anyio_backend``
fixture below, parametrized over:

- ``trio``: trio with ``MockClock(autojump_threshold=0)`` (virtual time);
- ``asyncio``: asyncio on :class:`AutojumpLoop` (virtual time, autojump);
- ``asyncio-eager``: the same loop with ``asyncio.eager_task_factory`` (3.12+);
- ``uvloop``: uvloop, real time. Only for tests marked ``pytest.mark.timeless``
  (their outcome does not depend on the clock: no window, no sleep), because
  uvloop's clock cannot be virtual and no test sleeps on the wall clock.

Trio-only behaviour keeps ``pytest.mark.trio`` (pytest-trio) with ``autojump_clock``.
A module can still pin a backend by defining its own ``anyio_backend`` fixture.
"""

from __future__ import annotations

import asyncio
import selectors
import sys
from typing import Any

import pytest
import trio.testing


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


def eager_autojump_loop() -> AutojumpLoop:
    """An :class:`AutojumpLoop` whose tasks start eagerly (Python 3.12+)."""
    loop = AutojumpLoop()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
    return loop


def asyncio_autojump_backend() -> tuple[str, dict[str, Any]]:
    """Backend spec for anyio's plugin: asyncio on :class:`AutojumpLoop`."""
    return "asyncio", {"loop_factory": AutojumpLoop}


VIRTUAL_TIME_BACKENDS = ["trio", "asyncio"] + (
    ["asyncio-eager"] if sys.version_info >= (3, 12) else []
)
try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extra on POSIX
    uvloop = None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "timeless: the test does not depend on the clock; it runs on uvloop too",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "anyio_backend" not in metafunc.fixturenames:
        return
    if "anyio_backend" in metafunc.definition.getparent(pytest.Module).obj.__dict__:
        return  # the module pins its backend
    for mark in metafunc.definition.iter_markers("parametrize"):
        if "anyio_backend" in str(mark.args[0]):
            return  # the test pins its backend(s)
    names = list(VIRTUAL_TIME_BACKENDS)
    if uvloop is not None and metafunc.definition.get_closest_marker("timeless"):
        names.append("uvloop")
    metafunc.parametrize("anyio_backend", names, indirect=True)


@pytest.fixture
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    name = getattr(request, "param", "asyncio")
    if name == "trio":
        return "trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}
    if name == "asyncio":
        return "asyncio", {"loop_factory": AutojumpLoop}
    if name == "asyncio-eager":
        return "asyncio", {"loop_factory": eager_autojump_loop}
    if name == "asyncio-real":  # real time, for tests of wall-clock programs
        return "asyncio", {}
    if name == "uvloop":
        assert uvloop is not None
        return "asyncio", {"loop_factory": uvloop.new_event_loop}
    raise AssertionError(name)


@pytest.fixture
def backend_name(anyio_backend: Any, request: pytest.FixtureRequest) -> str:
    """``trio``, ``asyncio``, ``asyncio-eager`` or ``uvloop``: the running backend."""
    return getattr(request.node.callspec, "params", {}).get("anyio_backend", "asyncio")
