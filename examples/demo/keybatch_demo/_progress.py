"""The live progress line of a run."""

from __future__ import annotations

from typing import TextIO


class Progress:
    """A live progress line: in place on a terminal, plain periodic lines otherwise.

    Args:
        out: Where to write.
        label: Names the run on each line.
        seconds: Length of the run, for "time left".
        start: The run's start time (`time.perf_counter()`).
        tty: Whether `out` is a terminal; default `out.isatty()`.
    """

    def __init__(
        self,
        out: TextIO,
        label: str,
        seconds: float,
        start: float,
        tty: bool | None = None,
    ) -> None:
        self.out = out
        self.label = label
        self.tty = out.isatty() if tty is None else tty
        self.interval = 0.2 if self.tty else 2.0
        self._start = self._last_time = start
        self._end = start + seconds
        self._last_done = 0
        self._width = 0

    def update(self, done: int, now: float) -> None:
        """Show `done` operations at `now`, and the rate since the last call."""
        elapsed = now - self._last_time
        rate = (done - self._last_done) / elapsed if elapsed > 0 else 0.0
        self._last_done, self._last_time = done, now
        left = max(0.0, self._end - now)
        self._write(
            f"{self.label}: {done:,} operations, {rate:,.0f} ops/s, {left:.1f} s left"
        )

    def finish(self, done: int, now: float) -> None:
        """Show the final count and end the line."""
        line = f"{self.label}: {done:,} operations in {now - self._start:.1f} s"
        self._write(line)
        if self.tty:
            self.out.write("\n")
            self.out.flush()

    def _write(self, line: str) -> None:
        if self.tty:
            self.out.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.out.write(line + "\n")
        self.out.flush()
