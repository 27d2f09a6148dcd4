"""Type-checked by mypy --strict and pyright (`nox -s types`); never run.

What a user's type checker infers from keybatch.writer.
"""

from __future__ import annotations

from collections.abc import Hashable

from typing_extensions import assert_type

from keybatch import writer as kw


class Row:
    id: int = 0


async def sink(key: Hashable, rows: list[Row]) -> int:
    return len(rows)


def on_error(key: Hashable, rows: list[Row], exc: BaseException) -> None:
    assert_type(rows, list[Row])


def on_flush(report: kw.FlushReport) -> None:
    assert_type(report.items, int)
    assert_type(report.attempts, int)
    assert_type(report.duration, float)
    assert_type(report.bytes, int | None)
    assert_type(report.error, BaseException | None)


async def main() -> None:
    backoff = kw.exponential_backoff(0.1, 5.0, jitter=False)
    assert_type(backoff(1), float)
    async with kw.open_writer(
        sink,
        batch_size=100,
        flush_interval=0.5,
        backoff=backoff,
        on_error=on_error,
        on_flush=on_flush,
    ) as writer:
        assert_type(writer, kw.Writer[Row])
        assert_type(writer.flush_interval, float)
        assert_type(await writer.write(Row(), key="orders", id=1), None)
        assert_type(writer.write_nowait(Row(), after=[1]), None)
        assert_type(await writer.write_sync(Row()), None)
        assert_type(await writer.flush(), None)
        stats = writer.statistics()
        assert_type(stats, kw.WriterStatistics)
        assert_type(stats.items_written, int)
        assert_type(stats.buffered, int)
        # an item of another type is caught by the checker
        await writer.write("not a row")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]

    try:
        pass
    except kw.DependencyFailed as exc:
        assert_type(exc.dependency, Hashable)
    except kw.WriteError as exc:
        assert_type(exc.key, Hashable)
