"""Integrations with monitoring systems, each behind an optional extra.

- [`keybatch.contrib.opentelemetry`][keybatch.contrib.opentelemetry]: spans and
  metrics from [`BatchReport`][keybatch.BatchReport]s and
  [`statistics()`][keybatch.Processor.statistics] (extra `otel`).
- [`keybatch.contrib.prometheus`][keybatch.contrib.prometheus]: a collector over
  `statistics()` and histograms from `BatchReport`s (extra `prometheus`).

This package imports neither; only its submodules need their extra. It holds
[`combine_hooks`][keybatch.contrib.combine_hooks], which gives one `on_batch` hook
to several consumers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .._records import BatchReport

__all__ = ["combine_hooks"]

logger = logging.getLogger("keybatch.contrib")


def combine_hooks(
    *hooks: Callable[[BatchReport], object],
) -> Callable[[BatchReport], None]:
    """Return one `on_batch` hook that calls each of `hooks` in turn.

    A hook that raises does not stop the others: its exception is logged to the
    `keybatch.contrib` logger (WARNING) and the next hook runs. The combined hook
    never raises.

    Args:
        *hooks: Plain callables, each given every
            [`BatchReport`][keybatch.BatchReport].

    Returns:
        A plain callable to pass as `on_batch` to
        [`open_processor`][keybatch.open_processor].

    Example:
        ```python
        hook = combine_hooks(tracer, histograms.hook("accounts"))
        async with keybatch.open_processor(load=load, on_batch=hook) as processor:
            ...
        ```
    """
    chosen = tuple(hooks)
    for hook in chosen:
        if not callable(hook):
            raise TypeError(f"on_batch hooks must be callable, got {hook!r}")

    def combined(report: BatchReport) -> None:
        for hook in chosen:
            try:
                hook(report)
            except Exception:
                logger.warning("keybatch: on_batch hook %r raised", hook, exc_info=True)

    return combined
