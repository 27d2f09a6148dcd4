"""docs/semantics.md, "Options": the option table, and invalid values refused
when `open_processor` is called, before anything starts."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest

import keybatch

from ..helpers import append, list_store, opener

pytestmark = pytest.mark.anyio


async def _async_fn(*args: Any) -> None:  # pragma: no cover - never called
    return None


async def _real_load(key: str) -> int:  # pragma: no cover - never awaited
    return 0


class _AsyncCall:
    async def __call__(self, report: Any) -> None:  # pragma: no cover
        return None


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"min_duration": -1}, ValueError, "min_duration must be >= 0"),
        ({"min_duration": math.nan}, ValueError, "min_duration must be >= 0"),
        ({"min_duration": math.inf}, ValueError, "min_duration must be finite"),
        ({"min_duration": 1, "max_duration": 0.5}, ValueError, "must be >= min"),
        ({"max_duration": -1, "min_duration": 0}, ValueError, "max_duration must"),
        ({"max_duration": math.nan, "min_duration": 0}, ValueError, "max_duration"),
        ({"min_duration": "1"}, TypeError, "number of seconds"),
        ({"min_duration": True}, TypeError, "number of seconds"),
        ({"max_duration": "2"}, TypeError, "number of seconds"),
        ({"workers": 0}, ValueError, "workers must be at least 1"),
        ({"workers": 1.5}, TypeError, "workers must be an int"),
        ({"max_ops": 0}, ValueError, "max_ops must be at least 1"),
        ({"max_ops": True}, TypeError, "max_ops must be an int"),
        ({"max_pending": 0}, ValueError, "max_pending must be at least 1"),
        ({"max_pending": 2.0}, TypeError, "max_pending must be an int"),
        ({"max_replays": -1}, ValueError, "max_replays must be at least 0"),
        ({"max_replays": None}, TypeError, "max_replays must be an int"),
        ({"load": lambda key: None}, TypeError, "load must be an async function"),
        ({"load": lambda key: _real_load(key)}, TypeError, "load must be an async"),
        ({"load": "not callable"}, TypeError, "load must be an async function"),
        ({"save": print}, TypeError, "save must be an async function"),
        ({"on_batch": _async_fn}, TypeError, "on_batch must be a plain"),
        ({"on_batch": _AsyncCall()}, TypeError, "on_batch must be a plain"),
        ({"on_batch": 3}, TypeError, "on_batch must be a plain"),
        ({"worker_for_key": 3}, TypeError, "worker_for_key must be a plain"),
        ({"worker_for_key": _async_fn}, TypeError, "worker_for_key must be"),
    ],
    ids=repr,
)
def test_invalid_options_raise_when_open_processor_is_called(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        keybatch.open_processor(**options)  # not entered: nothing started


@pytest.mark.parametrize(
    "options",
    [
        {"min_duration": 0, "max_duration": None},
        {"min_duration": 0, "max_duration": math.inf},
        {"min_duration": 0, "max_duration": 5},
        {"min_duration": 0, "workers": 1, "max_ops": 1, "max_pending": 1},
        {"min_duration": 0, "max_replays": 0},
        {"min_duration": 0, "on_batch": print},
        {"min_duration": 0, "on_batch": logging.info},
        {"min_duration": 0, "worker_for_key": lambda key, n: 0},
    ],
    ids=repr,
)
@pytest.mark.timeless
async def test_valid_options_open_a_working_processor(options: dict[str, Any]) -> None:
    store = list_store()
    async with opener(store, **options) as processor:
        assert await processor.run("a", append, 1) == 1
    assert store.data == {"a": [1]}


def test_processor_and_pending_have_no_public_constructor() -> None:
    with pytest.raises(TypeError, match="no public constructor"):
        keybatch.Processor()
    with pytest.raises(TypeError, match="no public constructor"):
        keybatch.Pending()
