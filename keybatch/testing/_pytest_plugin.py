"""keybatch's pytest plugin: the fixtures of `keybatch.testing`.

pytest loads it through the `pytest11` entry point named `keybatch` as soon as
keybatch is installed, so the fixtures need no import in a `conftest.py`.
`-p no:keybatch` turns it off.
"""

from __future__ import annotations

import pytest
import trio.testing

__all__ = ["virtual_clock"]


@pytest.fixture
def virtual_clock() -> trio.testing.MockClock:
    """An autojump `trio.testing.MockClock` for pytest-trio tests.

    Request it in a `@pytest.mark.trio` test: pytest-trio runs the test on this
    clock, so time is virtual (it jumps to the next deadline whenever every task
    is blocked) and durations are exact. The same clock as pytest-trio's
    `autojump_clock`, under the name keybatch's docs use.

    !!! info "Changed in version 0.2"
        A pytest plugin registered through the `pytest11` entry point: found
        without importing it into a `conftest.py`.
    """
    return trio.testing.MockClock(autojump_threshold=0)
