"""keybatch.writer: flushing, retries, backpressure, dependencies, cancellation.

Every async test runs on trio and asyncio in virtual time (tests/conftest.py);
the property tests run each example on both, through ``run_virtual``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keybatch
from keybatch.writer import (
    DependencyFailed,
    FlushReport,
    WriteError,
    exponential_backoff,
    open_writer,
)

from ..loader.test_loader import run_virtual


class Sink:
    """Records each call (time, key, items); optional delay and scripted failures."""

    def __init__(
        self,
        delay: float = 0.0,
        failures: list[BaseException | None] | None = None,
        fail_keys: Any = (),
        result: Any = None,
    ) -> None:
        self.delay = delay
        self.failures = list(failures or [])
        self.fail_keys = fail_keys
        self.result = result
        self.calls: list[tuple[float, Any, list[Any]]] = []
        self.active = 0
        self.max_active = 0

    async def __call__(self, key: Any, items: list[Any]) -> Any:
        self.calls.append((anyio.current_time(), key, list(items)))
        exc = self.failures.pop(0) if self.failures else None  # in call order
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await anyio.sleep(self.delay)
            if key in self.fail_keys:
                raise ValueError(f"bad key {key}")
            if exc is not None:
                raise exc
        finally:
            self.active -= 1
        return self.result

    def written(self) -> list[Any]:
        return [item for _, _, items in self.calls for item in items]


class Errors:
    """An on_error hook that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, list[Any], BaseException]] = []

    def __call__(self, key: Any, items: list[Any], exc: BaseException) -> None:
        self.calls.append((key, list(items), exc))


# ---------------------------------------------------------------------------
# When a buffer is flushed
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_write_returns_at_once_and_flush_follows_the_interval() -> None:
    sink = Sink()
    async with open_writer(sink) as writer:
        await writer.write("a")
        await anyio.sleep(0.4)
        await writer.write("b")
        assert anyio.current_time() == 0.4
        assert sink.calls == []
        await anyio.sleep(1.0)
        assert sink.calls == [(1.0, None, ["a", "b"])]  # 1 s after the first item
        await writer.write("c")
        await anyio.sleep(5)
        assert sink.calls[1] == (2.4, None, ["c"])


@pytest.mark.anyio
async def test_full_buffer_is_flushed_at_once() -> None:
    sink = Sink(delay=0.1)
    async with open_writer(sink, batch_size=3) as writer:
        for i in range(7):
            await writer.write(i)
        assert anyio.current_time() == 0.0
        await anyio.sleep(5)
    # Flushes of one key never overlap: the second full batch waits for the
    # first; the last item waits for the interval, counted from when the key's
    # previous flush ended.
    assert sink.calls == [
        (0.0, None, [0, 1, 2]),
        (0.1, None, [3, 4, 5]),
        (1.2, None, [6]),
    ]


@pytest.mark.anyio
async def test_keys_have_their_own_buffers() -> None:
    sink = Sink()
    async with open_writer(sink, flush_interval=2.0) as writer:
        await writer.write(1, key="cpu")
        await writer.write(2, key=("mem", 3))
        await anyio.sleep(1)
        await writer.write(3, key="cpu")
        await anyio.sleep(5)
    assert sorted(sink.calls, key=repr) == [
        (2.0, "cpu", [1, 3]),
        (2.0, ("mem", 3), [2]),
    ]


@pytest.mark.anyio
async def test_flush_flushes_everything_now() -> None:
    assert keybatch.worker_for_key("a", 2) != keybatch.worker_for_key("b", 2)
    sink = Sink(delay=0.5)
    async with open_writer(sink, flush_interval=10) as writer:
        await writer.write(1, key="a")
        await writer.write(2, key="b")
        await anyio.sleep(1)
        await writer.flush()
        assert anyio.current_time() == 1.5
        assert sorted(sink.calls) == [(1.0, "a", [1]), (1.0, "b", [2])]
        assert writer.statistics().buffered == 0


@pytest.mark.anyio
async def test_leaving_the_block_flushes_what_is_left() -> None:
    sink = Sink(delay=0.5)
    async with open_writer(sink, flush_interval=10, batch_size=2) as writer:
        for i in range(5):
            await writer.write(i)
    assert anyio.current_time() == 1.5
    assert sink.written() == [0, 1, 2, 3, 4]
    stats = writer.statistics()
    assert (stats.items_written, stats.flushes, stats.buffered) == (5, 3, 0)


@pytest.mark.anyio
async def test_write_after_close_raises() -> None:
    async with open_writer(Sink()) as writer:
        pass
    with pytest.raises(keybatch.ProcessorStopped):
        await writer.write(1)
    with pytest.raises(keybatch.ProcessorStopped):
        writer.write_nowait(1)
    with pytest.raises(keybatch.ProcessorStopped):
        await writer.write_sync(1)


@pytest.mark.parametrize(("concurrent", "end"), [(1, 6.0), (2, 3.0), (3, 2.0)])
@pytest.mark.anyio
async def test_concurrent_flushes_bound_sink_calls(concurrent: int, end: float) -> None:
    # Int keys 0..5 hash to themselves: keys spread evenly over the flush tasks.
    sink = Sink(delay=1.0)
    async with open_writer(sink, concurrent_flushes=concurrent) as writer:
        for key in range(6):
            await writer.write(key, key=key)
    assert sink.max_active == concurrent
    assert anyio.current_time() == end
    assert sorted(sink.written()) == list(range(6))


@pytest.mark.anyio
async def test_jitter_is_drawn_for_every_flush() -> None:
    sink = Sink()
    async with open_writer(sink, flush_interval=1.0, jitter=0.5) as writer:
        assert writer.flush_interval == 1.0
        starts = []
        for n in range(20):
            starts.append(anyio.current_time())
            await writer.write(n)
            await anyio.sleep(2)
    waits = [t - start for (t, _, _), start in zip(sink.calls, starts, strict=True)]
    assert all(1.0 <= wait <= 1.5 for wait in waits)
    assert len(set(waits)) > 10  # a fresh draw every time


# ---------------------------------------------------------------------------
# write_sync
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_write_sync_returns_once_its_flush_succeeded() -> None:
    sink = Sink(delay=0.25)
    async with open_writer(sink) as writer:
        await writer.write("a")
        await writer.write_sync("b")
        assert anyio.current_time() == 1.25
        assert sink.calls == [(1.0, None, ["a", "b"])]


@pytest.mark.anyio
async def test_write_sync_callers_get_their_own_error() -> None:
    failure = ValueError("rejected")
    sink = Sink(failures=[failure])
    errors = Errors()
    caught: list[WriteError] = []
    async with open_writer(sink, on_error=errors) as writer:

        async def one(item: int) -> None:
            try:
                await writer.write_sync(item, key="k")
            except WriteError as exc:
                caught.append(exc)

        async with anyio.create_task_group() as nursery:
            for i in range(3):
                nursery.start_soon(one, i)
    assert len(caught) == 3
    assert len({id(exc) for exc in caught}) == 3
    for exc in caught:
        assert exc.key == "k"
        assert exc.__cause__ is failure
        assert "after 1 attempt" in str(exc)
    assert len(sink.calls) == 1  # ValueError is not transient: no retry
    assert errors.calls == [("k", sink.calls[0][2], failure)]
    stats = writer.statistics()
    assert (stats.failed_items, stats.failed_flushes, stats.items_written) == (3, 1, 0)


@pytest.mark.anyio
async def test_cancelled_write_sync_before_its_flush_is_withdrawn() -> None:
    sink = Sink()
    async with open_writer(sink) as writer:
        await writer.write("kept")
        with anyio.move_on_after(0.5) as scope:
            await writer.write_sync("withdrawn")
        assert scope.cancelled_caught
        assert writer.statistics().buffered == 1
        await anyio.sleep(1)
        assert sink.calls == [(1.0, None, ["kept"])]
        await writer.write_sync("next")  # the writer still works
    assert sink.written() == ["kept", "next"]


@pytest.mark.anyio
async def test_cancelled_write_sync_during_its_flush_is_still_written() -> None:
    sink = Sink(delay=1.0)
    async with open_writer(sink) as writer:
        with anyio.move_on_after(1.5) as scope:
            await writer.write_sync("x", id="x")
        assert scope.cancelled_caught
        await anyio.sleep(1)
        # Its id counts as written: a dependent is not held.
        await writer.write("y", after=["x"])
        assert writer.statistics().held == 0
    assert sink.written() == ["x", "y"]
    assert writer.statistics().items_written == 2


# ---------------------------------------------------------------------------
# Retries
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_transient_failures_are_retried_with_backoff() -> None:
    sink = Sink(failures=[OSError("down"), TimeoutError("slow")])
    reports: list[FlushReport] = []
    async with open_writer(
        sink, backoff=lambda retry: 10.0 * retry, on_flush=reports.append
    ) as writer:
        await writer.write_sync("a")
        assert anyio.current_time() == 31.0
    assert [t for t, _, _ in sink.calls] == [1.0, 11.0, 31.0]
    stats = writer.statistics()
    assert (stats.retries, stats.items_written, stats.flushes) == (2, 1, 1)
    assert reports == [
        FlushReport(
            key=None,
            items=1,
            attempts=3,
            start=1.0,
            duration=30.0,
            bytes=None,
            error=None,
        )
    ]


@pytest.mark.anyio
async def test_retries_stop_after_max_retries() -> None:
    failures: list[BaseException | None] = [OSError(i) for i in range(5)]
    sink = Sink(failures=list(failures))
    errors = Errors()
    reports: list[FlushReport] = []
    async with open_writer(
        sink,
        max_retries=2,
        backoff=lambda retry: 1.0,
        on_error=errors,
        on_flush=reports.append,
    ) as writer:
        await writer.write("a", key="k")
        await writer.write("b", key="k")
        with pytest.raises(WriteError) as info:
            await writer.write_sync("c", key="k")
    assert [t for t, _, _ in sink.calls] == [1.0, 2.0, 3.0]
    assert info.value.__cause__ is failures[2]
    assert "3 items" in str(info.value)
    assert "after 3 attempt(s)" in str(info.value)
    assert errors.calls == [("k", ["a", "b", "c"], failures[2])]
    assert reports[0].error is failures[2]
    assert reports[0].attempts == 3
    stats = writer.statistics()
    assert (stats.retries, stats.failed_items, stats.failed_flushes) == (2, 3, 1)


@pytest.mark.anyio
async def test_retry_on_decides_what_is_transient() -> None:
    sink = Sink(failures=[ValueError("5xx"), OSError("4xx")])
    errors = Errors()
    async with open_writer(
        sink,
        retry_on=lambda exc: isinstance(exc, ValueError),
        backoff=lambda retry: 0.5,
        on_error=errors,
    ) as writer:
        await writer.write(1)
    assert [t for t, _, _ in sink.calls] == [0.0, 0.5]  # the exit flush, a retry
    assert isinstance(errors.calls[0][2], OSError)


@pytest.mark.anyio
async def test_backoff_does_not_block_new_writes() -> None:
    sink = Sink(failures=[OSError("down")])
    async with open_writer(sink, backoff=lambda retry: 10.0) as writer:
        await writer.write(1)
        await anyio.sleep(2)  # the first flush failed at 1.0 and waits to retry
        assert writer.statistics().retries == 1
        for i in range(2, 5):
            await writer.write(i)
            writer.write_nowait(10 * i)
        assert anyio.current_time() == 2.0
        assert writer.statistics().buffered == 7
    assert [(t, items) for t, _, items in sink.calls] == [
        (1.0, [1]),
        (11.0, [1]),
        (11.0, [2, 20, 3, 30, 4, 40]),  # closed by the exit flush
    ]


def test_exponential_backoff_without_jitter() -> None:
    backoff = exponential_backoff(0.1, 1.0, jitter=False)
    assert [backoff(n) for n in range(1, 7)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    )
    assert backoff(10_000) == 1.0
    with pytest.raises(ValueError, match="initial"):
        exponential_backoff(-1)
    with pytest.raises(ValueError, match="maximum"):
        exponential_backoff(0.1, math.inf)


@given(
    initial=st.floats(0, 5),
    maximum=st.floats(0, 100),
    retry=st.integers(1, 200),
)
def test_exponential_backoff_jitter_stays_in_its_band(
    initial: float, maximum: float, retry: int
) -> None:
    full = exponential_backoff(initial, maximum, jitter=False)(retry)
    delay = exponential_backoff(initial, maximum)(retry)
    assert full <= maximum
    assert full / 2 <= delay <= full


@pytest.mark.anyio
async def test_raising_hooks_are_logged_and_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def bad_hook(*args: Any) -> None:
        raise RuntimeError("hook")

    def bad_retry_on(exc: BaseException) -> bool:
        raise RuntimeError("retry_on")

    sink = Sink(failures=[OSError("down")])
    with caplog.at_level(logging.ERROR, logger="keybatch.writer"):
        async with open_writer(
            sink, on_error=bad_hook, on_flush=bad_hook, retry_on=bad_retry_on
        ) as writer:
            await writer.write(1)
            await writer.flush()
            await writer.write_sync(2)  # another flush: the writer still works
    assert len(sink.calls) == 2  # retry_on raised: not retried
    assert writer.statistics().items_written == 1
    messages = [r.getMessage() for r in caplog.records]
    assert sum("raised; ignored" in m for m in messages) == 3  # 2 on_flush, 1 on_error
    assert sum("retry_on raised" in m for m in messages) == 1


# ---------------------------------------------------------------------------
# Statistics and reports
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_statistics_count_bytes_the_sink_reports() -> None:
    reports: list[FlushReport] = []
    sink = Sink(delay=0.5, result=100)
    async with open_writer(sink, batch_size=2, on_flush=reports.append) as writer:
        for i in range(3):
            await writer.write(i)
        stats = writer.statistics()
        assert (stats.buffered, stats.held, stats.items_written) == (3, 0, 0)
    stats = writer.statistics()
    assert stats == keybatch.writer.WriterStatistics(
        items_written=3,
        flushes=2,
        failed_flushes=0,
        failed_items=0,
        retries=0,
        buffered=0,
        held=0,
        bytes_written=200,
        dropped_items=0,
    )
    assert [(r.items, r.start, r.duration, r.bytes) for r in reports] == [
        (2, 0.0, 0.5, 100),
        (1, 0.5, 0.5, 100),
    ]


@pytest.mark.anyio
async def test_sink_result_that_is_not_an_int_is_ignored() -> None:
    reports: list[FlushReport] = []
    async with open_writer(Sink(result="ok"), on_flush=reports.append) as writer:
        await writer.write(1)
    assert reports[0].bytes is None
    assert writer.statistics().bytes_written == 0


# ---------------------------------------------------------------------------
# Backpressure
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_write_waits_for_room_and_write_nowait_refuses() -> None:
    sink = Sink()
    async with open_writer(sink, batch_size=10, max_buffered=3) as writer:
        for i in range(3):
            await writer.write(i)
        with pytest.raises(keybatch.Overloaded):
            writer.write_nowait(99)
        await writer.write(3)  # waits for the flush at 1.0
        assert anyio.current_time() == 1.0
        assert writer.statistics().buffered == 1
    assert sink.written() == [0, 1, 2, 3]


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_default_max_buffered_is_ten_batches(backend: str) -> None:
    async def main() -> None:
        async with open_writer(Sink(), batch_size=2) as writer:
            for i in range(20):
                writer.write_nowait(i)
            with pytest.raises(keybatch.Overloaded, match="max_buffered=20"):
                writer.write_nowait(20)

    run_virtual(main, backend)


@pytest.mark.anyio
async def test_cancelled_wait_for_room_accepts_nothing() -> None:
    sink = Sink()
    async with open_writer(sink, max_buffered=1) as writer:
        await writer.write("a")
        with anyio.move_on_after(0.5):
            await writer.write("never")
        with anyio.move_on_after(0.5):
            await writer.write_sync("never either")
        assert writer.statistics().buffered == 1
        await writer.write("b")  # gets room at 1.0
        assert anyio.current_time() == 1.0
    assert sink.written() == ["a", "b"]


@pytest.mark.anyio
async def test_writers_waiting_for_room_are_refused_when_closing() -> None:
    sink = Sink()
    outcomes: list[Any] = []
    async with anyio.create_task_group() as nursery:
        async with open_writer(sink, max_buffered=1) as writer:
            await writer.write("a")

            async def blocked() -> None:
                try:
                    await writer.write("b")
                except keybatch.ProcessorStopped as exc:
                    outcomes.append(exc)

            nursery.start_soon(blocked)
            await anyio.wait_all_tasks_blocked()
    assert len(outcomes) == 1
    assert sink.written() == ["a"]


# ---------------------------------------------------------------------------
# Dependencies
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_item_is_held_until_its_dependency_was_written() -> None:
    # The two keys have their own flush tasks (default concurrent_flushes=2).
    assert keybatch.worker_for_key("refs", 2) != keybatch.worker_for_key("objects", 2)
    sink = Sink(delay=0.5)
    async with open_writer(sink) as writer:
        await writer.write("ref", key="refs", after=["o1"])  # unknown: not held
        await writer.write("obj", key="objects", id="o1")
        await writer.write("ref->o1", key="refs", id="r1", after=["o1"])
        await writer.write("ref->r1", key="refs", after=["r1", "unknown"])
        assert writer.statistics().held == 2
        await anyio.sleep(10)
        assert writer.statistics().held == 0
    # o1 is written at 1.0-1.5; ref->o1 enters the refs buffer at 1.5 (the refs
    # buffer flushed "ref" meanwhile), is written at 2.5-3.0; then ref->r1.
    assert sorted(sink.calls[:2]) == [
        (1.0, "objects", ["obj"]),
        (1.0, "refs", ["ref"]),
    ]
    assert sink.calls[2:] == [
        (2.5, "refs", ["ref->o1"]),
        (4.0, "refs", ["ref->r1"]),
    ]


@pytest.mark.anyio
async def test_failed_dependency_fails_its_dependents() -> None:
    sink = Sink(fail_keys={"objects"})
    errors = Errors()
    caught: list[DependencyFailed] = []
    async with open_writer(sink, on_error=errors) as writer:
        await writer.write("obj", key="objects", id="o1")
        await writer.write("ref", key="refs", id="r1", after=["o1"])
        await writer.write("ref2", key="refs", after=["r1"])

        async def sync_dependent() -> None:
            try:
                await writer.write_sync("ref3", key="refs", after=["o1"])
            except DependencyFailed as exc:
                caught.append(exc)

        async with anyio.create_task_group() as nursery:
            nursery.start_soon(sync_dependent)
            nursery.start_soon(sync_dependent)
        assert anyio.current_time() == 1.0
        # An id known to have failed fails a new dependent at once.
        await writer.write("late", key="refs", after=["r1"])
    assert [key for _, key, _ in sink.calls] == ["objects"]
    assert [(key, items) for key, items, _ in errors.calls] == [
        ("objects", ["obj"]),
        ("refs", ["ref"]),
        ("refs", ["ref3"]),
        ("refs", ["ref3"]),
        ("refs", ["ref2"]),
        ("refs", ["late"]),
    ]
    ref_error = errors.calls[1][2]
    assert isinstance(ref_error, DependencyFailed)
    assert ref_error.dependency == "o1"
    assert "'o1'" in str(ref_error)
    assert "failed to flush (ValueError: bad key objects)" in str(ref_error)
    ref2_error = errors.calls[4][2]
    assert isinstance(ref2_error, DependencyFailed)
    assert ref2_error.dependency == "r1"
    assert str(ref2_error) == (
        "the item was not written: it waited for 'r1', which was not written"
        " (it waited for 'o1')"
    )
    assert errors.calls[5][2].dependency == "r1"  # type: ignore[attr-defined]
    assert len(caught) == 2
    assert caught[0] is not caught[1]
    assert all(exc.dependency == "o1" for exc in caught)
    stats = writer.statistics()
    assert (stats.failed_items, stats.buffered, stats.held) == (6, 0, 0)


@pytest.mark.anyio
async def test_rewriting_a_failed_id_clears_its_failure() -> None:
    sink = Sink(failures=[ValueError("once")])
    async with open_writer(sink) as writer:
        with pytest.raises(WriteError):
            await writer.write_sync("v1", id="x")
        await writer.write("v2", id="x")
        await writer.write("dependent", after=["x"])
        assert writer.statistics().held == 1
    assert sink.written() == ["v1", "v2", "dependent"]


@pytest.mark.anyio
async def test_bad_ids_are_refused() -> None:
    async with open_writer(Sink()) as writer:
        await writer.write(1, id="a")
        with pytest.raises(ValueError, match="already buffered"):
            await writer.write(2, id="a")
        with pytest.raises(ValueError, match="already buffered"):
            await writer.write_sync(2, id="a")
        with pytest.raises(ValueError, match="after itself"):
            writer.write_nowait(3, id="b", after=["b"])
        with pytest.raises(TypeError):
            await writer.write(4, key=[], after=["a"])  # type: ignore[arg-type]
        assert writer.statistics().buffered == 1


@pytest.mark.anyio
async def test_flush_and_close_wait_for_held_chains() -> None:
    sink = Sink(delay=0.5)
    async with open_writer(sink, flush_interval=100) as writer:
        await writer.write(0, key=0, id=0)
        for i in range(1, 4):
            await writer.write(i, key=i % 2, id=i, after=[i - 1])
        await writer.flush()
        assert anyio.current_time() == 2.0  # four flushes one after another
        assert sink.written() == [0, 1, 2, 3]
        await writer.write(4, key=0, id=4)
        await writer.write(5, key=1, after=[4])
    assert anyio.current_time() == 3.0
    assert sink.written() == [0, 1, 2, 3, 4, 5]


@pytest.mark.anyio
async def test_write_sync_waits_for_its_dependencies() -> None:
    sink = Sink(delay=0.5)
    async with open_writer(sink) as writer:
        await writer.write("obj", key="objects", id="o1")
        await writer.write_sync("ref", key="refs", after=["o1"])
        assert anyio.current_time() == 3.0  # o1 at 1.0-1.5, ref at 2.5-3.0
    assert sink.written() == ["obj", "ref"]


@pytest.mark.anyio
async def test_cancelled_write_sync_fails_items_waiting_for_it() -> None:
    sink = Sink()
    errors = Errors()
    async with open_writer(sink, on_error=errors) as writer:
        await writer.write("obj", key="objects", id="o1")
        with anyio.move_on_after(0.5):
            # held for o1, then cancelled: withdrawn
            await writer.write_sync("ref", key="refs", id="r1", after=["o1"])
        await writer.write("ref2", key="refs", after=["r1"])
        with anyio.move_on_after(0.5):
            await writer.write_sync("x", id="x")  # in the buffer, then cancelled
        await writer.write("y", after=["x"])
    assert sink.written() == ["obj"]
    assert [items for _, items, _ in errors.calls] == [["ref2"], ["y"]]
    assert "its write_sync was cancelled" in str(errors.calls[0][2])
    stats = writer.statistics()
    assert (stats.failed_items, stats.buffered) == (2, 0)


# ---------------------------------------------------------------------------
# Teardown and bad input
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_teardown_finishes_flushes_in_progress_and_drops_the_rest() -> None:
    sink = Sink(delay=1.0)
    with pytest.raises(RuntimeError, match="boom"):
        async with open_writer(sink, batch_size=2, flush_interval=10) as writer:
            for i in range(3):
                await writer.write(i, id=i)
            await writer.write("held", after=[2])
            await anyio.sleep(0.5)
            raise RuntimeError("boom")
    assert anyio.current_time() == 1.0  # the flush in progress finished
    assert sink.written() == [0, 1]
    stats = writer.statistics()
    assert (stats.items_written, stats.dropped_items, stats.buffered) == (2, 2, 0)


@pytest.mark.anyio
async def test_teardown_fails_held_write_sync_with_processor_stopped() -> None:
    sink = Sink(delay=1.0)
    outcomes: list[BaseException] = []

    async def held_caller(writer: Any) -> None:
        try:
            await writer.write_sync("ref", key="refs", after=["o1"])
        except keybatch.ProcessorStopped as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as outer:
        with pytest.raises(RuntimeError, match="boom"):
            async with open_writer(sink, flush_interval=10) as writer:
                await writer.write("obj", key="objects", id="o1")
                outer.start_soon(held_caller, writer)
                await anyio.wait_all_tasks_blocked()
                assert writer.statistics().held == 1
                raise RuntimeError("boom")
    assert len(outcomes) == 1
    assert "torn down" in str(outcomes[0])
    assert sink.calls == []
    stats = writer.statistics()
    assert (stats.dropped_items, stats.held, stats.buffered) == (2, 0, 0)


def test_bad_options_are_refused_when_opening() -> None:
    async def sink(key: Any, items: list[Any]) -> None:
        pass

    def sync_sink(key: Any, items: list[Any]) -> None:
        pass

    async def async_hook(*args: Any) -> None:
        pass

    with pytest.raises(TypeError, match="sink must be an async function"):
        open_writer(sync_sink)  # type: ignore[arg-type]
    kwargs: dict[str, Any]
    for kwargs in (
        {"batch_size": 0},
        {"batch_size": -5},
        {"max_buffered": 0},
        {"concurrent_flushes": 0},
        {"max_retries": -1},
        {"flush_interval": -1},
        {"flush_interval": math.inf},
        {"flush_interval": math.nan},
        {"jitter": -0.1},
    ):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            open_writer(sink, **kwargs)
    for kwargs in (
        {"batch_size": 2.5},
        {"batch_size": True},
        {"flush_interval": "1"},
        {"on_error": async_hook},
        {"on_flush": 3},
        {"retry_on": async_hook},
    ):
        with pytest.raises(TypeError, match=next(iter(kwargs))):
            open_writer(sink, **kwargs)


def test_writer_has_no_public_constructor() -> None:
    with pytest.raises(TypeError, match="no public constructor"):
        keybatch.writer.Writer()  # type: ignore[call-arg]


# ---------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    writes=st.lists(
        st.tuples(st.sampled_from("abc"), st.sampled_from([0.0, 0.0, 0.3, 1.1])),
        max_size=60,
    ),
    batch_size=st.integers(1, 6),
    concurrent=st.integers(1, 3),
    transient=st.lists(st.booleans(), max_size=10),
    delay=st.sampled_from([0.0, 0.2, 1.5]),
)
@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_every_item_is_written_once_in_order_per_key(
    backend: str,
    writes: list[tuple[str, float]],
    batch_size: int,
    concurrent: int,
    transient: list[bool],
    delay: float,
) -> None:
    sink = Sink(delay=delay, failures=[OSError("t") if t else None for t in transient])

    async def main() -> None:
        async with open_writer(
            sink,
            batch_size=batch_size,
            concurrent_flushes=concurrent,
            max_retries=len(transient),
            backoff=lambda retry: 0.7,
        ) as writer:
            for n, (key, pause) in enumerate(writes):
                await writer.write((key, n), key=key)
                if pause:
                    await anyio.sleep(pause)
        stats = writer.statistics()
        assert stats.items_written == len(writes)
        assert stats.buffered == 0
        assert stats.retries == len(sink.calls) - stats.flushes

    run_virtual(main, backend)
    successful: dict[str, list[Any]] = {}
    failing = list(transient)
    for _, key, items in sink.calls:
        assert 1 <= len(items) <= batch_size
        assert all(k == key for k, _ in items)
        if failing and failing.pop(0):
            continue
        successful.setdefault(key, []).extend(items)
    for key in "abc":
        expected = [(k, n) for n, (k, _) in enumerate(writes) if k == key]
        assert successful.get(key, []) == expected


# ---------------------------------------------------------------------------
# asyncio subset (no virtual time there: windows are long, flushes explicit)
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_asyncio_flush_on_size_and_on_exit() -> None:
    sink = Sink()
    async with open_writer(sink, batch_size=2, flush_interval=100) as writer:
        for i in range(5):
            await writer.write(i)
        await writer.flush()
        assert writer.statistics().items_written == 5
        await writer.write(5)
    assert [items for _, _, items in sink.calls] == [[0, 1], [2, 3], [4], [5]]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
@pytest.mark.anyio
async def test_asyncio_write_sync_errors_and_retries() -> None:
    failure = ValueError("no")
    sink = Sink(failures=[OSError("transient"), failure])
    errors = Errors()
    caught: list[BaseException] = []
    async with open_writer(
        sink, flush_interval=100, backoff=lambda retry: 0.0, on_error=errors
    ) as writer:

        async def one(i: int) -> None:
            try:
                await writer.write_sync(i)
            except WriteError as exc:
                caught.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 1)
            tg.start_soon(one, 2)
            await anyio.wait_all_tasks_blocked()
            await writer.flush()
    assert len(sink.calls) == 2
    assert len(caught) == 2
    assert caught[0] is not caught[1]
    assert all(exc.__cause__ is failure for exc in caught)
    assert errors.calls == [(None, [1, 2], failure)]
    assert writer.statistics().retries == 1


@pytest.mark.anyio
async def test_asyncio_cancelled_write_sync_is_withdrawn() -> None:
    sink = Sink()
    async with open_writer(sink, flush_interval=100) as writer:
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.write_sync, "withdrawn")
            await anyio.wait_all_tasks_blocked()
            assert writer.statistics().buffered == 1
            tg.cancel_scope.cancel()
        assert writer.statistics().buffered == 0
        await writer.write("kept")
    assert sink.written() == ["kept"]


@pytest.mark.anyio
async def test_asyncio_backpressure_and_dependencies() -> None:
    sink = Sink()
    async with open_writer(sink, flush_interval=100, max_buffered=2) as writer:
        await writer.write("obj", key="objects", id="o1")
        await writer.write("ref", key="refs", after=["o1"])
        assert writer.statistics().held == 1
        with pytest.raises(keybatch.Overloaded):
            writer.write_nowait("x")
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.write, "waits")
            await anyio.wait_all_tasks_blocked()
            assert writer.statistics().buffered == 2
            await writer.flush()
    written = sink.written()
    assert written.index("obj") < written.index("ref")
    assert sorted(sink.written()) == ["obj", "ref", "waits"]


class RecordingSink:
    """Records each call's start and end; fails the calls the script says."""

    def __init__(self, script: list[bool], delay: float) -> None:
        self.script = list(script)
        self.delay = delay
        self.calls: list[tuple[float, float, Any, list[Any], bool]] = []

    async def __call__(self, key: Any, items: list[Any]) -> None:
        fail = self.script.pop(0) if self.script else False
        start = anyio.current_time()
        await anyio.sleep(self.delay)
        self.calls.append((start, anyio.current_time(), key, list(items), not fail))
        if fail:
            raise ValueError("rejected")


def depends_on(n: int, back: list[int]) -> list[int]:
    return sorted({n - b for b in back if n - b >= 0})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=st.lists(
        st.tuples(
            st.sampled_from("ab"),
            st.lists(st.integers(1, 4), max_size=3),  # how many items back
            st.booleans(),
            st.sampled_from([0.0, 0.0, 0.4, 1.3]),
        ),
        max_size=30,
    ),
    script=st.lists(st.booleans(), max_size=12),
    delay=st.sampled_from([0.0, 0.3]),
    batch_size=st.integers(1, 4),
)
@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_dependencies_hold_and_fail_items_as_promised(
    backend: str,
    items: list[tuple[str, list[int], bool, float]],
    script: list[bool],
    delay: float,
    batch_size: int,
) -> None:
    sink = RecordingSink(script, delay)
    errors = Errors()
    sync_failures: dict[int, BaseException] = {}

    async def main() -> None:
        async with (
            open_writer(sink, batch_size=batch_size, on_error=errors) as writer,
            anyio.create_task_group() as nursery,
        ):
            for n, (key, back, sync, pause) in enumerate(items):
                deps = depends_on(n, back)
                if sync:

                    async def write_sync(n: int, key: str, deps: list[int]) -> None:
                        try:
                            await writer.write_sync(n, key=key, id=n, after=deps)
                        except WriteError as exc:
                            sync_failures[n] = exc

                    nursery.start_soon(write_sync, n, key, deps)
                    await anyio.wait_all_tasks_blocked()
                else:
                    await writer.write(n, key=key, id=n, after=deps)
                if pause:
                    await anyio.sleep(pause)
        stats = writer.statistics()
        assert (stats.buffered, stats.held, stats.dropped_items) == (0, 0, 0)
        assert stats.items_written + stats.failed_items == len(items)

    run_virtual(main, backend)
    written: dict[int, tuple[int, float]] = {}  # item -> its flush, when it began
    ended: dict[int, float] = {}  # item -> when its successful flush ended
    for i, (start, end, _, call_items, ok) in enumerate(sink.calls):
        assert len(call_items) <= batch_size
        if ok:
            for n in call_items:
                assert n not in written  # written once
                written[n] = (i, start)
                ended[n] = end
    failed = {n for _, call_items, _ in errors.calls for n in call_items}
    assert not failed & set(written)
    assert failed | set(written) == set(range(len(items)))
    sink_failed = {
        m
        for _, its, exc in errors.calls
        if not isinstance(exc, DependencyFailed)
        for m in its
    }
    for n, (_, back, sync, _) in enumerate(items):
        deps = depends_on(n, back)
        if n in written:
            # written only after every item it names was written
            for d in deps:
                assert d in written
                assert written[d][0] != written[n][0]
                assert ended[d] <= written[n][1]
        else:
            assert n in sink_failed or any(d in failed for d in deps)
        if sync:
            assert (n in sync_failures) == (n in failed)
    for _, call_items, exc in errors.calls:
        if isinstance(exc, DependencyFailed):
            (n,) = call_items
            assert exc.dependency in depends_on(n, items[n][1])
            assert exc.dependency in failed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    calls=st.lists(
        st.tuples(
            st.sampled_from("ab"),
            st.sampled_from([0.0, 0.2, 0.9, 1.0, 1.1]),  # when it starts
            st.none() | st.sampled_from([0.0, 0.1, 0.5, 1.0, 1.05, 1.3, 2.5]),
        ),
        max_size=25,
    ),
    batch_size=st.integers(1, 5),
    delay=st.sampled_from([0.0, 0.1, 0.3]),
)
@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_cancelled_write_sync_at_any_point_leaves_nothing_stuck(
    backend: str,
    calls: list[tuple[str, float, float | None]],
    batch_size: int,
    delay: float,
) -> None:
    sink = Sink(delay=delay)
    returned: set[int] = set()
    cancelled: set[int] = set()

    async def main() -> None:
        async with open_writer(sink, batch_size=batch_size) as writer:
            async with anyio.create_task_group() as nursery:
                for n, (key, start, cancel_after) in enumerate(calls):

                    async def one(n: int, key: str, start: float, cancel: Any) -> None:
                        await anyio.sleep(start)
                        with anyio.move_on_after(
                            math.inf if cancel is None else cancel
                        ):
                            await writer.write_sync(n, key=key, id=n)
                            returned.add(n)
                            return
                        cancelled.add(n)

                    nursery.start_soon(one, n, key, start, cancel_after)
            await writer.flush()  # a cancelled caller's item may be in a flush
            stats = writer.statistics()
            assert (stats.buffered, stats.held) == (0, 0)
            await writer.write_sync("after", key="a")  # still works
        assert writer.statistics().buffered == 0

    run_virtual(main, backend)
    written = sink.written()
    assert len(written) == len(set(written))  # nothing written twice
    assert returned <= set(written)
    assert returned | cancelled == set(range(len(calls)))
    assert "after" in written
