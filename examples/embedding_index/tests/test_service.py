"""The actors' bodies on one keybatch processor, without Dramatiq.

`IndexService` runs on trio and asyncio alike; messages it would send
(reschedules, reindex subtasks) are recorded by a fake dispatch, and the tests
deliver them by hand, which lets them interleave work exactly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from embindex import IndexService, ReindexRefused, Settings, Store
from embindex.service import delete_op, upsert_op
from embindex.workload import rebuild_diff, sentences

pytestmark = pytest.mark.anyio


class Sent(list[tuple[str, int, str, "float | None"]]):
    def __call__(
        self, actor: str, task_id: int, route: str, delay: float | None
    ) -> None:
        self.append((actor, task_id, route, delay))

    def take(self, actor: str) -> list[int]:
        found = [m[1] for m in self if m[0] == actor]
        self[:] = [m for m in self if m[0] != actor]
        return found


@asynccontextmanager
async def service_on(
    settings: Settings, store: Store, **changes: Any
) -> AsyncIterator[tuple[IndexService, Sent]]:
    store.create_model("alpha", "hashing:dim=64")
    store.create_model("beta", "hashing:dim=32")
    sent = Sent()
    service = IndexService(Settings(**{**settings.__dict__, **changes}), store, sent)
    async with service.running():
        yield service, sent


def upserts(store: Store, model: str, items: list[tuple[str, str]]) -> int:
    payload = {"items": [{"id": i, "text": t} for i, t in items]}
    return store.create_tasks([("upsert", model, payload)])[0]


def deletes(store: Store, model: str, ids: list[str]) -> int:
    return store.create_tasks([("delete", model, {"ids": ids})])[0]


def texts_of(store: Store, model: str) -> dict[str, str]:
    return {item: text for item, (text, _) in store.contents(model).items()}


async def all_of(*calls: Callable[[], Any]) -> None:
    async with anyio.create_task_group() as tg:
        for call in calls:
            tg.start_soon(call)


async def test_concurrent_tasks_share_batches(settings: Settings, store: Store) -> None:
    async with service_on(settings, store) as (service, _):
        texts = sentences(40, seed=2)
        ids = [upserts(store, "alpha", [(f"i{n}", t)]) for n, t in enumerate(texts)]
        await all_of(*[lambda i=i: service.upsert(i) for i in ids])
        stats = dict(service.stats)
    assert {t.status for t in store.tasks(ids)} == {"done"}
    assert texts_of(store, "alpha") == {f"i{n}": t for n, t in enumerate(texts)}
    # One embedding call and one transaction per batch, not per task.
    assert stats["batched_tasks"] == 40
    assert stats["embed_calls"] == stats["batches"] < 40
    assert stats["embedded_texts"] == 40


async def test_operations_apply_in_call_order(settings: Settings, store: Store) -> None:
    async with service_on(settings, store, window=0.2) as (service, _):
        await service.processor.run("alpha", upsert_op, 0, [("keep", "kept text")])
        processor = service.processor
        t1 = upserts(store, "alpha", [("x", "first x"), ("y", "doomed y")])
        t2 = upserts(store, "alpha", [("x", "second x")])
        t3 = deletes(store, "alpha", ["y", "keep"])
        t4 = upserts(store, "alpha", [("keep", "back again")])
        calls = service.stats["embed_calls"]
        # Submitted back to back: one batch of four operations.
        pendings = [
            processor.submit(
                "alpha", upsert_op, t1, [("x", "first x"), ("y", "doomed y")]
            ),
            processor.submit("alpha", upsert_op, t2, [("x", "second x")]),
            processor.submit("alpha", delete_op, t3, ["y", "keep"]),
            processor.submit("alpha", upsert_op, t4, [("keep", "back again")]),
        ]
        assert [await p.result() for p in pendings] == [2, 1, 2, 1]
        assert service.stats["embed_calls"] == calls + 1
    # A later upsert of x wins; the delete cancels the upsert of y; an upsert
    # after a delete revives the item.
    assert texts_of(store, "alpha") == {"x": "second x", "keep": "back again"}
    assert {t.status for t in store.tasks([t1, t2, t3, t4])} == {"done"}
    assert rebuild_diff(store, "alpha", "alpha") == []


async def test_bad_input_fails_the_task_only(settings: Settings, store: Store) -> None:
    async with service_on(settings, store) as (service, _):
        bad = {
            "unknown model": upserts(store, "nope", [("a", "text")]),
            "empty text": upserts(store, "alpha", [("a", "ok"), ("b", "  ")]),
            "oversized batch": upserts(
                store, "alpha", [(f"i{n}", "t") for n in range(51)]
            ),
            "needs a non-empty list 'ids'": store.create_tasks(
                [("delete", "alpha", {})]
            )[0],
            "onto itself": store.create_tasks(
                [("reindex", "alpha", {"dest": "alpha"})]
            )[0],
            "unknown model 'gamma'": store.create_tasks(
                [("reindex", "alpha", {"dest": "gamma"})]
            )[0],
        }
        good = upserts(store, "alpha", [("fine", "a fine text")])
        await all_of(
            *[lambda i=bad[k]: service.upsert(i) for k in list(bad)[:3]],
            lambda: service.delete(bad["needs a non-empty list 'ids'"]),
            lambda: service.reindex(bad["onto itself"]),
            lambda: service.reindex(bad["unknown model 'gamma'"]),
            lambda: service.upsert(good),
            lambda: service.upsert(999_999),  # no such task: logged, ignored
        )
    for expected, task_id in bad.items():
        task = store.task(task_id)
        assert task is not None
        assert task.status == "failed", (expected, task)
        assert expected in (task.error or ""), (expected, task.error)
    assert texts_of(store, "alpha") == {"fine": "a fine text"}
    assert service.stats["unknown_tasks"] == 1


async def test_reindex_with_forwarding(settings: Settings, store: Store) -> None:
    async with service_on(settings, store) as (service, sent):
        texts = sentences(10, seed=3)
        first = upserts(store, "alpha", [(f"i{n}", t) for n, t in enumerate(texts)])
        await service.upsert(first)
        reindex = store.create_tasks([("reindex", "alpha", {"dest": "beta"})])[0]
        await service.reindex(reindex)
        chunks = sent.take("reindex_subworker")
        assert len(chunks) == 3  # chunk_size 4
        assert store.lock_of("alpha") is not None
        # Work arrives while the reindex runs: applied and forwarded.
        await service.reindex_chunk(chunks[0])
        during = [
            upserts(
                store, "alpha", [("i1", "rewritten during the reindex"), ("new", "n")]
            ),
            deletes(store, "alpha", ["i5", "i9"]),
            upserts(store, "beta", [("direct", "written to the destination")]),
        ]
        await all_of(
            lambda: service.upsert(during[0]),
            lambda: service.delete(during[1]),
            lambda: service.upsert(during[2]),
        )
        for chunk in chunks[1:]:
            await service.reindex_chunk(chunk)
    done = store.task(reindex)
    assert done is not None
    assert done.status == "done", done
    for task in store.tasks(during):
        assert task.status == "done"
        assert f"forwarded to reindex #{reindex}" in (task.note or "")
    assert store.lock_of("alpha") is None
    assert store.lock_of("beta") is None
    expected = {f"i{n}": t for n, t in enumerate(texts) if n not in (5, 9)}
    expected.update({"i1": "rewritten during the reindex", "new": "n"})
    assert texts_of(store, "alpha") == expected
    # beta = alpha rebuilt + the write addressed to beta during the reindex
    assert texts_of(store, "beta") == {
        **expected,
        "direct": "written to the destination",
    }
    diffs = rebuild_diff(store, "alpha", "beta")
    assert diffs == ["direct: extra in 'beta'"]
    assert sorted(store.vec_tables()) == ["vec_1_1", "vec_2_2"]  # old beta collected


async def test_no_forwarding_waits_then_runs(settings: Settings, store: Store) -> None:
    async with service_on(settings, store, forwarding=False) as (service, sent):
        await service.upsert(upserts(store, "alpha", [("a", "text a")]))
        reindex = store.create_tasks([("reindex", "alpha", {"dest": "beta"})])[0]
        await service.reindex(reindex)
        (chunk,) = sent.take("reindex_subworker")
        late = upserts(store, "alpha", [("b", "text b")])
        await service.upsert(late)
        waiting = store.task(late)
        assert waiting is not None
        assert waiting.status == "waiting"
        assert waiting.attempts == 1
        assert "locked by reindex" in (waiting.note or "")
        assert sent == [("upsertion_worker", late, "alpha", settings.reschedule_delay)]
        sent.clear()
        await service.reindex_chunk(chunk)  # the reindex ends, the lock goes
        await service.upsert(late)  # the rescheduled message
    assert texts_of(store, "alpha") == {"a": "text a", "b": "text b"}
    assert texts_of(store, "beta") == {"a": "text a"}
    final = store.task(late)
    assert final is not None
    assert final.status == "done"
    assert final.attempts == 2


async def test_no_forwarding_no_waiting_refuses(
    settings: Settings, store: Store
) -> None:
    async with service_on(settings, store, forwarding=False, waiting=False) as (
        service,
        _,
    ):
        await service.upsert(upserts(store, "alpha", [("a", "text a")]))
        await service.reindex(
            store.create_tasks([("reindex", "alpha", {"dest": "beta"})])[0]
        )
        late = upserts(store, "alpha", [("b", "text b")])
        await service.upsert(late)
    task = store.task(late)
    assert task is not None
    assert task.status == "refused"
    assert "forwarding and waiting are off" in (task.error or "")


async def test_reindex_waits_with_bounded_attempts(
    settings: Settings, store: Store
) -> None:
    async with service_on(settings, store) as (service, sent):
        store.create_model("gamma", "hashing:dim=16")
        holder, blocked = store.create_tasks(
            [
                ("reindex", "alpha", {"dest": "beta"}),
                ("reindex", "gamma", {"dest": "beta"}),
            ]
        )
        await service.upsert(upserts(store, "alpha", [("a", "text a")]))
        await service.reindex(holder)  # its chunk never runs: it holds the lock
        for _ in range(settings.reschedule_attempts + 1):
            await service.reindex(blocked)
        retries = sent.take("reindex_worker")
    assert retries == [blocked] * settings.reschedule_attempts
    task = store.task(blocked)
    assert task is not None
    assert task.status == "failed"
    assert task.error == (
        f"gave up after {settings.reschedule_attempts} reschedules:"
        f" model 'beta' is locked by reindex #{holder}"
    )


async def test_reindex_refused_without_waiting(
    settings: Settings, store: Store
) -> None:
    async with service_on(settings, store, waiting=False) as (service, _):
        holder, blocked = store.create_tasks(
            [
                ("reindex", "alpha", {"dest": "beta"}),
                ("reindex", "beta", {"dest": "alpha"}),
            ]
        )
        await service.upsert(upserts(store, "alpha", [("a", "text a")]))
        await service.reindex(holder)  # its chunk never runs: it holds the lock
        with pytest.raises(ReindexRefused, match=f"locked by reindex #{holder}"):
            await service.reindex(blocked)
    task = store.task(blocked)
    assert task is not None
    assert task.status == "refused"
    assert task.error == f"model 'beta' is locked by reindex #{holder}; waiting is off"


async def test_reindex_meets_a_held_exclusive_section(
    settings: Settings, store: Store
) -> None:
    """In-process, the reindex lock is `processor.exclusive`: a section held
    on a model makes a reindex of it wait, then count the model busy."""
    async with service_on(settings, store, exclusive_timeout=0.05) as (service, sent):
        reindex = store.create_tasks([("reindex", "alpha", {"dest": "beta"})])[0]
        async with service.processor.exclusive("beta"):
            await service.reindex(reindex)
        task = store.task(reindex)
        assert task is not None
        assert task.status == "waiting"
        assert "'beta' are busy in this worker" in (task.note or "")
        assert sent.take("reindex_worker") == [reindex]
        await service.reindex(reindex)  # the section is gone: it runs
    task = store.task(reindex)
    assert task is not None
    assert task.status == "done"


async def test_swap_waits_for_operations_called_before(
    settings: Settings, store: Store
) -> None:
    """The last chunk swaps under `exclusive(source, dest)`: an upsert of the
    source called before it is saved (and forwarded) before the swap."""
    async with service_on(settings, store, window=0.05) as (service, sent):
        await service.upsert(upserts(store, "alpha", [("a", "text a")]))
        reindex = store.create_tasks([("reindex", "alpha", {"dest": "beta"})])[0]
        await service.reindex(reindex)
        (chunk,) = sent.take("reindex_subworker")
        late = upserts(store, "alpha", [("b", "text b")])
        async with anyio.create_task_group() as tg:
            tg.start_soon(service.upsert, late)
            while service.processor.statistics().pending_operations == 0:  # noqa: ASYNC110
                await anyio.sleep(0.001)  # until the upsert is queued in its window
            tg.start_soon(service.reindex_chunk, chunk)
    assert texts_of(store, "beta") == {"a": "text a", "b": "text b"}
    assert rebuild_diff(store, "alpha", "beta") == []
