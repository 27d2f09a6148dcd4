"""Retrying a failed sink call: which failures, how often, and how long to wait."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable

__all__ = ["MAX_BACKOFF", "RetryPolicy", "exponential_backoff", "retry_transient"]

logger = logging.getLogger("keybatch.writer")

MAX_BACKOFF = 300.0
"""The longest wait before a retry, in seconds: a longer `backoff` (`inf`
included) is cut to it, so a retrying flush always tries again."""


def exponential_backoff(
    initial: float = 0.1, maximum: float = 10.0, *, jitter: bool = True
) -> Callable[[int], float]:
    """Return a `backoff(retry) -> seconds` function for `open_writer`.

    Retry `n` (1 for the first retry) waits `min(maximum, initial * 2**(n-1))`
    seconds; with `jitter`, a random duration between half of that and all of it,
    so writers that failed together do not retry together.

    Raises:
        ValueError: `initial` or `maximum` is negative or not finite.
    """
    for name, value in (("initial", initial), ("maximum", maximum)):
        if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    def backoff(retry: int) -> float:
        delay: float = min(maximum, initial * 2.0 ** min(retry - 1, 64))
        if jitter:
            delay = random.uniform(delay / 2, delay)
        return delay

    return backoff


def retry_transient(exc: BaseException) -> bool:
    """The default `retry_on`: OSError and TimeoutError are transient."""
    return isinstance(exc, (OSError, TimeoutError))


class RetryPolicy:
    """The `max_retries`, `retry_on` and `backoff` of one writer.

    The user's callables may raise: that is logged, and the flush goes on as if
    `retry_on` said no, or `backoff` said zero.
    """

    __slots__ = ("max_retries", "retry_on", "backoff")

    def __init__(
        self,
        max_retries: int,
        retry_on: Callable[[BaseException], bool],
        backoff: Callable[[int], float],
    ) -> None:
        self.max_retries = max_retries
        self.retry_on = retry_on
        self.backoff = backoff

    def should_retry(self, attempts: int, exc: BaseException) -> bool:
        """Retry after `attempts` sink calls, the last of which raised `exc`?"""
        if attempts > self.max_retries:
            return False
        try:
            return bool(self.retry_on(exc))
        except Exception:
            logger.exception("keybatch.writer: retry_on raised; not retrying")
            return False

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1, 2, ...), at most
        `MAX_BACKOFF`."""
        try:
            delay = float(self.backoff(retry))
        except Exception:
            logger.exception("keybatch.writer: backoff raised; retrying at once")
            return 0.0
        if not delay > 0:  # negative and NaN: at once
            return 0.0
        return min(delay, MAX_BACKOFF)  # inf and huge: bounded
