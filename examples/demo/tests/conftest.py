"""The demo's tests import `keybatch_demo` from the example's folder, wherever
pytest runs from; async tests run on trio unless they ask for asyncio."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture
def anyio_backend() -> str:
    return "trio"
