"""Property test: random interleavings equal applying operations one by one."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keybatch

from .helpers import outcome_of

_call = st.tuples(
    st.sampled_from(["a", "b", "c"]),  # key
    st.integers(-5, 5),  # amount
    st.sampled_from([0.0, 0.0, 0.01, 0.05, 0.2]),  # virtual delay before the call
    st.sampled_from(["ok", "ok", "ok", "raise", "cancel"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    calls=st.lists(_call, max_size=25),
    min_duration=st.sampled_from([0.0, 0.03, 0.1]),
    max_ops=st.sampled_from([None, 1, 2, 5]),
    workers=st.integers(1, 3),
)
def test_random_interleavings_match_sequential_application(
    calls: list[tuple[str, int, float, str]],
    min_duration: float,
    max_ops: int | None,
    workers: int,
) -> None:
    saved: dict[str, int] = {}
    applied: list[tuple[str, int]] = []  # (key, call index), in application order
    results: dict[int, Any] = {}

    async def load(key: str) -> list[int]:
        return [saved.get(key, 0)]

    async def save(key: str, box: list[int]) -> None:
        saved[key] = box[0]

    def op(box: list[int], index: int, key: str, amount: int, kind: str) -> int:
        applied.append((key, index))
        if kind == "raise":
            raise ArithmeticError(index)
        box[0] += amount
        return box[0]

    async def main() -> None:
        async with (
            keybatch.open_processor(
                load=load,
                save=save,
                min_duration=min_duration,
                max_ops=max_ops,
                workers=workers,
            ) as processor,
            trio.open_nursery() as nursery,
        ):
            for index, (key, amount, delay, kind) in enumerate(calls):
                await trio.sleep(delay)

                async def call(index: int = index, key: str = key) -> None:
                    amount, kind = calls[index][1], calls[index][3]
                    with trio.CancelScope() as scope:
                        if kind == "cancel":
                            scope.deadline = trio.current_time() + 0.02
                        results[index] = await outcome_of(
                            lambda: processor.run(key, op, index, key, amount, kind)
                        )

                nursery.start_soon(call)
                await trio.lowlevel.checkpoint()  # the call is enqueued in order

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    applied_set = [i for _, i in applied]
    assert len(applied_set) == len(set(applied_set)), "applied at most once"
    for key in "abc":
        mine = [i for i, c in enumerate(calls) if c[0] == key]
        applied_here = [i for k, i in applied if k == key]
        assert applied_here == [i for i in mine if i in applied_here], "call order"
        total = 0
        for i in applied_here:
            _, amount, _, kind = calls[i]
            if kind == "raise":
                assert isinstance(results[i], ArithmeticError)
                continue
            total += amount
            if i in results and kind == "ok":
                assert results[i] == total, "each op saw exactly the ones before it"
        assert saved.get(key, 0) == total
        for i in mine:
            if calls[i][3] != "cancel":
                assert i in applied_here, "nothing accepted is lost"
