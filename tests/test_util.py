"""Private helpers: async-callable detection and the no-public-constructor metaclass."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from keybatch._util import NoPublicConstructor, is_async_callable


async def coro_fn(x: int) -> int:
    return x


async def agen_fn() -> Any:
    yield 1


class Thing:
    async def amethod(self) -> None:
        pass

    def method(self) -> None:
        pass


class AsyncCallable:
    async def __call__(self) -> None:
        pass


class SyncCallable:
    def __call__(self) -> None:
        pass


@pytest.mark.parametrize(
    "obj",
    [
        coro_fn,
        agen_fn,
        functools.partial(coro_fn, 1),
        Thing().amethod,
        Thing.amethod,
        AsyncCallable(),
    ],
)
def test_async_callables(obj: object) -> None:
    assert is_async_callable(obj)


@pytest.mark.parametrize(
    "obj",
    [
        lambda: None,
        print,
        functools.partial(print, 1),
        Thing().method,
        SyncCallable(),
        int,
        42,
    ],
)
def test_plain_callables_and_non_callables(obj: object) -> None:
    assert not is_async_callable(obj)


def test_no_public_constructor() -> None:
    class Built(metaclass=NoPublicConstructor):
        def __init__(self, x: int) -> None:
            self.x = x

    with pytest.raises(TypeError, match="no public constructor"):
        Built(1)
    assert Built._create(2).x == 2  # type: ignore[attr-defined]
