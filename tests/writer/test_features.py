"""keybatch.writer: what issue 10 added (per-item results, accumulated results,
aclose, close_timeout, slots shared by every key, exceptions that pickle).

Every async test runs on trio and asyncio in virtual time (tests/conftest.py).
"""

from __future__ import annotations

import copy
import math
import pickle
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keybatch
from keybatch.writer import (
    DependencyFailed,
    FailedItem,
    FlushReport,
    Partial,
    WriteError,
    WriteResults,
    open_writer,
)

from ..loader.test_loader import run_virtual
from ._support import Errors, Sink


class Rejected(Exception):
    """A permanent per-item failure (a 4xx)."""


class Busy(OSError):
    """A transient per-item failure (a 429)."""


def rejecting(rules: dict[Any, list[BaseException | None]]) -> Any:
    """A respond= function: the item ``x`` fails with ``rules[x][n]`` on its
    n-th call (None: written), and is written once its list runs out."""
    seen: dict[Any, int] = {}

    def respond(key: Any, items: list[Any]) -> Partial:
        failed = {}
        for i, item in enumerate(items):
            n = seen.get(item, 0)
            seen[item] = n + 1
            script = rules.get(item, [])
            if n < len(script) and script[n] is not None:
                failed[i] = script[n]
        return Partial(failed=failed, bytes=10 * len(items))

    return respond


# ---------------------------------------------------------------------------
# Per-item results
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_partial_retries_only_the_transient_items() -> None:
    busy = Busy("slow down")
    rejected = Rejected("bad field")
    sink = Sink(respond=rejecting({"b": [busy, busy], "c": [rejected]}))
    errors = Errors()
    reports: list[FlushReport] = []
    async with open_writer(
        sink,
        backoff=lambda retry: 1.0,
        on_error=errors,
        on_flush=reports.append,
    ) as writer:
        for item in "abcd":
            await writer.write(item)
    assert [(t, items) for t, _, items in sink.calls] == [
        (0.0, ["a", "b", "c", "d"]),  # the exit flush
        (1.0, ["b"]),
        (2.0, ["b"]),
    ]
    assert errors.calls == [(None, ["c"], rejected)]
    stats = writer.statistics()
    assert (stats.items_written, stats.failed_items, stats.retries) == (3, 1, 2)
    assert (stats.failed_flushes, stats.flushes, stats.bytes_written) == (1, 0, 60)
    assert reports == [
        FlushReport(
            key=None,
            items=4,
            attempts=3,
            start=0.0,
            duration=2.0,
            bytes=60,
            error=None,
            failed=1,
        )
    ]
    results = writer.results()
    assert results.succeeded == 3
    assert results.failed == (FailedItem("c", None, None, rejected, 1),)


@pytest.mark.anyio
async def test_write_sync_callers_get_their_own_items_outcome() -> None:
    rejected = Rejected("duplicate key")
    sink = Sink(respond=rejecting({2: [rejected]}))
    outcomes: dict[int, Any] = {}
    async with open_writer(sink, flush_interval=1) as writer:

        async def one(n: int) -> None:
            try:
                await writer.write_sync(n, key="k")
                outcomes[n] = "written"
            except WriteError as exc:
                outcomes[n] = exc

        async with anyio.create_task_group() as tg:
            for n in range(4):
                tg.start_soon(one, n)
    assert [outcomes[n] for n in (0, 1, 3)] == ["written"] * 3
    error = outcomes[2]
    assert type(error) is WriteError
    assert error.__cause__ is rejected
    assert error.attempts == 1
    assert not error.may_have_landed
    assert "rejected item" in str(error)
    assert error.key == "k"


@pytest.mark.anyio
async def test_dependents_of_a_rejected_item_fail_naming_it() -> None:
    rejected = Rejected("no such class")
    sink = Sink(respond=rejecting({"obj": [rejected]}))
    errors = Errors()
    async with open_writer(sink, on_error=errors) as writer:
        await writer.write("obj", key="objects", id="o1")
        await writer.write("fine", key="objects", id="o2")
        await writer.write("ref", key="refs", after=["o1", "o2"])
        await writer.write("ref2", key="refs", after=["o2"])
    failed = {items[0]: exc for _, items, exc in errors.calls}
    assert failed["obj"] is rejected
    assert isinstance(failed["ref"], DependencyFailed)
    assert failed["ref"].dependency == "o1"
    assert "no such class" in str(failed["ref"])
    assert sorted(sink.written()) == ["fine", "obj", "ref2"]


@pytest.mark.anyio
async def test_a_wrong_partial_fails_the_flush() -> None:
    sink = Sink(respond=lambda key, items: Partial(failed={len(items): ValueError()}))
    errors = Errors()
    async with open_writer(sink, on_error=errors) as writer:
        with pytest.raises(WriteError) as info:
            await writer.write_sync("a")
    assert isinstance(info.value.__cause__, TypeError)
    assert "Partial" in str(info.value.__cause__)
    assert errors.items() == ["a"]


# ---------------------------------------------------------------------------
# Accumulated results
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_results_are_bounded_and_drained_by_clear() -> None:
    sink = Sink(respond=rejecting({n: [Rejected(n)] for n in range(0, 10, 2)}))
    async with open_writer(sink, max_results=3) as writer:
        for n in range(10):
            await writer.write(n, id=n)
        await writer.flush()
        results = writer.results()
        assert isinstance(results, WriteResults)
        assert [failed.item for failed in results.failed] == [4, 6, 8]
        assert [failed.id for failed in results.failed] == [4, 6, 8]
        assert all(failed.attempts == 1 for failed in results.failed)
        assert (results.succeeded, results.omitted) == (5, 2)
        assert writer.results(clear=True) == results
        assert writer.results() == WriteResults((), 0, 0)
        await writer.write_sync("later")
        assert writer.results() == WriteResults((), 1, 0)


@pytest.mark.anyio
async def test_max_results_zero_keeps_counts_only() -> None:
    sink = Sink(respond=rejecting({"a": [Rejected()]}))
    async with open_writer(sink, max_results=0) as writer:
        await writer.write("a")
    assert writer.results() == WriteResults((), 0, 1)


# ---------------------------------------------------------------------------
# aclose
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_aclose_without_flush_drops_the_buffer_and_waits_for_flushes() -> None:
    sink = Sink(delay=1.0)
    errors = Errors()
    async with open_writer(sink, batch_size=2, on_error=errors) as writer:
        await writer.write("a", key="k", id="a")
        await writer.write("b", key="k")  # a full buffer: flushing at once
        await writer.write("c", key="k", id="c")
        await writer.write("d", key="other", after=["c"])
        dropped = await writer.aclose(flush=False)
        assert anyio.current_time() == 1.0  # the flush in progress finished
        assert [(d.item, d.key, d.id) for d in dropped] == [
            ("c", "k", "c"),
            ("d", "other", None),
        ]
        assert all(isinstance(d.error, keybatch.ProcessorStopped) for d in dropped)
        with pytest.raises(keybatch.ProcessorStopped):
            await writer.write("late")
        assert await writer.aclose() == []
    assert sink.written() == ["a", "b"]
    assert errors.items() == ["c", "d"]
    stats = writer.statistics()
    assert (stats.items_written, stats.dropped_items, stats.buffered) == (2, 2, 0)
    assert [d.item for d in writer.results().failed] == ["c", "d"]


@pytest.mark.anyio
async def test_aclose_with_flush_closes_early() -> None:
    sink = Sink(delay=0.5)
    async with open_writer(sink, flush_interval=10) as writer:
        await writer.write("a")
        assert await writer.aclose() == []
        assert anyio.current_time() == 0.5
        assert sink.written() == ["a"]
        with pytest.raises(keybatch.ProcessorStopped):
            writer.write_nowait("b")
        with pytest.raises(keybatch.ProcessorStopped):
            await writer.flush()


# ---------------------------------------------------------------------------
# close_timeout
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_close_timeout_ends_retries_and_reports_their_items() -> None:
    failure = OSError("down")
    sink = Sink(script=[failure] * 100)
    errors = Errors()
    async with open_writer(
        sink,
        close_timeout=5,
        backoff=lambda retry: 2.0,
        max_retries=100,
        on_error=errors,
    ) as writer:
        await writer.write("a")
    assert anyio.current_time() == 5.0
    assert [t for t, _, _ in sink.calls] == [0.0, 2.0, 4.0]
    assert errors.calls == [(None, ["a"], failure)]
    assert writer.statistics().failed_items == 1


@pytest.mark.anyio
async def test_an_outer_deadline_ends_retries_at_once() -> None:
    failure = OSError("down")
    sink = Sink(script=[failure] * 100)
    errors = Errors()
    with anyio.move_on_after(2.5):
        async with open_writer(
            sink, backoff=lambda retry: 1.0, max_retries=100, on_error=errors
        ) as writer:
            writer.write_nowait("a")
            await anyio.sleep_forever()
    assert anyio.current_time() == 2.5
    assert [t for t, _, _ in sink.calls] == [1.0, 2.0]
    assert errors.calls == [(None, ["a"], failure)]


# ---------------------------------------------------------------------------
# Slots are shared by every key
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_slow_key_never_delays_another_while_a_slot_is_free() -> None:
    # With keys routed to fixed flush tasks, "slow" delayed the keys of its task.
    sink = Sink(delays={"slow": 10.0})
    async with open_writer(sink, batch_size=1, concurrent_flushes=2) as writer:
        await writer.write("s", key="slow")
        for key in ["a", "b", "c", "d"]:
            await writer.write(key, key=key)
        await anyio.sleep(0.1)
        assert sorted(sink.written()) == ["a", "b", "c", "d", "s"]


@pytest.mark.anyio
async def test_a_backoff_holds_no_slot() -> None:
    sink = Sink(script=[OSError("down")], delays={"fast": 0.5})
    async with open_writer(
        sink, batch_size=1, concurrent_flushes=1, backoff=lambda retry: 5.0
    ) as writer:
        await writer.write("x", key="failing")
        await anyio.sleep(0.1)  # failed at 0.0, retries at 5.0
        await writer.write("y", key="fast")
        await anyio.sleep(1)
        assert sink.times("y") == [0.1]


@pytest.mark.anyio
async def test_a_key_waiting_for_the_slot_goes_while_another_backs_off() -> None:
    sink = Sink(script=[OSError("down")], delay=1.0)
    async with open_writer(
        sink, batch_size=1, concurrent_flushes=1, backoff=lambda retry: 5.0
    ) as writer:
        await writer.write("x", key="failing")  # its call: 0.0 to 1.0, fails
        await writer.write("y", key="waiting")  # queued for the only slot
        await anyio.sleep(3)
        assert sink.times("y") == [1.0]
    assert sink.times("x") == [0.0, 6.0]


# ---------------------------------------------------------------------------
# Invariant: every accepted item is counted once
# ---------------------------------------------------------------------------


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    writes=st.lists(
        st.tuples(
            st.sampled_from("ab"),
            st.sampled_from([None, "transient", "permanent"]),
            st.sampled_from([0.0, 0.0, 0.3, 1.2]),
        ),
        max_size=30,
    ),
    batch_size=st.integers(1, 4),
    whole_failures=st.lists(st.booleans(), max_size=6),
    cancel_at=st.none() | st.sampled_from([0.5, 1.5, 3.0]),
    close_timeout=st.none() | st.sampled_from([0.0, 1.0]),
)
@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_every_accepted_item_is_counted_once(
    backend: str,
    writes: list[tuple[str, str | None, float]],
    batch_size: int,
    whole_failures: list[bool],
    cancel_at: float | None,
    close_timeout: float | None,
) -> None:
    rules: dict[Any, list[BaseException | None]] = {}
    for n, (_, kind, _) in enumerate(writes):
        if kind == "transient":
            rules[n] = [Busy(), Busy()]
        elif kind == "permanent":
            rules[n] = [Rejected()]
    respond = rejecting(rules)
    sink = Sink(
        delay=0.4,
        script=[OSError("all") if f else None for f in whole_failures],
        respond=respond,
    )
    errors = Errors()
    accepted: list[int] = []

    async def main() -> Any:
        with anyio.CancelScope() as scope:
            if cancel_at is not None:
                scope.deadline = anyio.current_time() + cancel_at
            async with open_writer(
                sink,
                batch_size=batch_size,
                backoff=lambda retry: 0.5,
                on_error=errors,
                close_timeout=close_timeout,
            ) as writer:
                for n, (key, _, pause) in enumerate(writes):
                    await writer.write(n, key=key)
                    accepted.append(n)
                    if pause:
                        await anyio.sleep(pause)
        return writer

    writer = run_virtual(main, backend)
    stats = writer.statistics()
    assert stats.buffered == 0
    assert stats.held == 0
    total = (
        stats.items_written
        + stats.failed_items
        + stats.dropped_items
        + stats.withdrawn_items
    )
    assert total == len(accepted)
    reported = errors.items()
    assert (
        len(reported) == len(set(reported)) == stats.failed_items + stats.dropped_items
    )
    results = writer.results()
    assert results.succeeded == stats.items_written
    assert sorted(f.item for f in results.failed) == sorted(reported)
    if cancel_at is None and close_timeout is None:
        assert stats.dropped_items == 0


# ---------------------------------------------------------------------------
# Exceptions round-trip
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        WriteError(("db", 1), "flushing 3 items failed", attempts=2),
        WriteError("k", "cut short", attempts=1, may_have_landed=True),
        DependencyFailed("refs", "the item was not written: it waited for 'o1'", "o1"),
    ],
    ids=["write-error", "may-have-landed", "dependency-failed"],
)
def test_exceptions_survive_pickle_and_copy(error: WriteError) -> None:
    for clone in (
        pickle.loads(pickle.dumps(error)),
        copy.copy(error),
        copy.deepcopy(error),
    ):
        assert type(clone) is type(error)
        assert clone.key == error.key
        assert str(clone) == str(error)
        assert clone.args == error.args
        assert clone.attempts == error.attempts
        assert clone.may_have_landed == error.may_have_landed
        if isinstance(error, DependencyFailed):
            assert clone.dependency == error.dependency  # type: ignore[attr-defined]


def test_bad_new_options_are_refused() -> None:
    async def sink(key: Any, items: list[Any]) -> None:
        pass

    for kwargs, exc in [
        ({"close_timeout": -1}, ValueError),
        ({"close_timeout": math.inf}, ValueError),
        ({"close_timeout": "1"}, TypeError),
        ({"max_failed_ids": -1}, ValueError),
        ({"max_results": -1}, ValueError),
        ({"max_results": 1.5}, TypeError),
    ]:
        with pytest.raises(exc, match=next(iter(kwargs))):
            open_writer(sink, **kwargs)
