"""Shared fixtures.

Trio is the reference backend: tests are marked ``pytest.mark.trio`` (pytest-trio)
and take ``autojump_clock`` to run in virtual time. The asyncio subset is marked
``pytest.mark.anyio`` and uses the ``anyio_backend`` fixture below.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
