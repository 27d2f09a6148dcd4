"""Virtual time: `run_autojump` and `assert_elapsed`."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
import trio
import trio.testing

__all__ = ["assert_elapsed", "run_autojump"]

T = TypeVar("T")


def run_autojump(
    async_fn: Callable[..., Awaitable[T]],
    *args: Any,
    clock: trio.testing.MockClock | None = None,
) -> T:
    """Run `async_fn(*args)` with `trio.run` under an autojump `MockClock`.

    Time is virtual: it starts at 0 and jumps to the next deadline whenever
    every task is blocked, so a test of a 10-minute scenario takes
    milliseconds and time assertions are exact.

    Args:
        async_fn: The async function to run.
        args: Its positional arguments.
        clock: A clock to use instead of `MockClock(autojump_threshold=0)`.
    """
    if clock is None:
        clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(async_fn, *args, clock=clock)


@contextmanager
def assert_elapsed(seconds: float, *, tolerance: float = 1e-9) -> Iterator[None]:
    """Assert that the block takes exactly `seconds` of event-loop time.

    Meant for virtual time (trio's `MockClock`), where durations are exact:

    ```python
    with keybatch.testing.assert_elapsed(0.1):
        await processor.run("k", op)
    ```

    Raises:
        AssertionError: The block took another time (checked only when the
            block did not raise).
    """
    start = anyio.current_time()
    yield
    elapsed = anyio.current_time() - start
    if not math.isclose(elapsed, seconds, rel_tol=0.0, abs_tol=tolerance):
        raise AssertionError(f"the block took {elapsed!r}s, expected {seconds!r}s")
