"""The four actors on Dramatiq's StubBroker: a real Dramatiq worker in-process
(AsyncIO middleware, one keybatch processor opened at boot), messages routed
to shard queues."""

from __future__ import annotations

from collections.abc import Callable

import dramatiq
import pytest
from conftest import StubCluster
from dramatiq.brokers.stub import StubBroker
from embindex import ReindexRefused, Settings, build_app
from embindex.app import queue_for, shards_of_process
from embindex.workload import rebuild_diff, sentences

import keybatch


def texts_of(cluster: StubCluster, model: str) -> dict[str, str]:
    return {k: v[0] for k, v in cluster.store.contents(model).items()}


def test_routing_is_key_affine() -> None:
    assert queue_for("alpha", 4) == f"index.{keybatch.worker_for_key('alpha', 4)}"
    assert shards_of_process(0, 2, 5) == [0, 2, 4]
    assert shards_of_process(1, 2, 5) == [1, 3]
    with pytest.raises(ValueError, match="index"):
        shards_of_process(2, 2, 5)


def test_upserts_and_deletes_are_batched(cluster: StubCluster) -> None:
    app = cluster.app
    texts = sentences(120, seed=4)
    ids = app.submit(
        [
            ("upsert", "alpha", {"items": [{"id": f"i{n}", "text": t}]})
            for n, t in enumerate(texts)
        ]
    )
    cluster.drain()
    ids.append(app.delete("alpha", [f"i{n}" for n in range(0, 60, 2)]))
    ids.append(app.delete("alpha", [f"i{n}" for n in range(60, 120, 2)]))
    cluster.drain()  # tasks sent together may apply in any order: wait
    ids.append(app.upsert("alpha", [("i0", "the zeroth item is back")]))
    cluster.drain()
    failed = [t for t in cluster.store.tasks(ids) if t.status != "done"]
    assert failed == []
    expected = {f"i{n}": t for n, t in enumerate(texts) if n % 2}
    expected["i0"] = "the zeroth item is back"
    assert texts_of(cluster, "alpha") == expected
    stats = app.service.stats
    assert stats["batched_tasks"] == 123
    assert stats["embed_calls"] <= stats["batches"] < 123  # tasks shared batches
    hit = cluster.store.nearest("alpha", texts[7], k=1)[0]
    assert (hit.item_id, hit.distance) == ("i7", pytest.approx(0, abs=1e-6))


def test_bad_input_each_a_clear_error(cluster: StubCluster) -> None:
    app = cluster.app
    bad = {
        "unknown model 'ghost'": app.upsert("ghost", [("a", "text")]),
        "item 'b': empty text": app.upsert("alpha", [("a", "fine"), ("b", "")]),
        "oversized batch: 51 items, at most 50 per task": app.upsert(
            "alpha", [(f"i{n}", "t") for n in range(51)]
        ),
        "cannot reindex model 'alpha' onto itself": app.reindex("alpha", "alpha"),
    }
    app.dispatch("upsertion_worker", 424242, "alpha")  # unknown task id
    app.dispatch("reindex_subworker", 434343, "alpha")
    good = app.upsert("alpha", [("ok", "the worker keeps going")])
    cluster.drain()
    for error, task_id in bad.items():
        task = cluster.store.task(task_id)
        assert task is not None
        assert (task.status, task.error) == ("failed", error)
    assert texts_of(cluster, "alpha") == {"ok": "the worker keeps going"}
    assert cluster.store.task(good).status == "done"  # type: ignore[union-attr]
    assert cluster.dead_letters() == []  # none of them crashed an actor


def test_reindex_end_to_end(cluster: StubCluster) -> None:
    app = cluster.app
    texts = sentences(30, seed=5)
    app.upsert("alpha", [(f"i{n}", t) for n, t in enumerate(texts)])
    cluster.drain()
    reindex = app.reindex("alpha", "beta")
    cluster.drain()
    task = cluster.store.task(reindex)
    assert task is not None
    assert task.status == "done", task
    chunks = [t for t in cluster.store.tasks() if t.parent == reindex]
    assert len(chunks) == 8
    assert {c.status for c in chunks} == {"done"}
    assert rebuild_diff(cluster.store, "alpha", "beta") == []
    assert cluster.store.lock_of("alpha") is None
    hit = cluster.store.nearest("beta", texts[3], k=1)[0]
    assert hit.item_id == "i3"


def test_refused_reindex_is_dead_lettered_not_retried(
    make_cluster: Callable[..., StubCluster],
) -> None:
    cluster = make_cluster(waiting=False)
    app = cluster.app
    store = cluster.store
    store.create_model("gamma", "hashing:dim=16")
    # A reindex holding beta (taken directly, its chunks never sent).
    (holder,) = store.create_tasks([("reindex", "alpha", {"dest": "beta"})])
    app.upsert("alpha", [("a", "text")])
    cluster.drain()
    assert isinstance(store.begin_reindex(holder, "alpha", "beta", 4, 60), list)
    refused = app.reindex("gamma", "beta")
    cluster.drain()
    task = store.task(refused)
    assert task is not None
    assert task.status == "refused"
    assert task.error == f"model 'beta' is locked by reindex #{holder}; waiting is off"
    (dead,) = cluster.dead_letters()
    assert isinstance(dead._exception, ReindexRefused)
    assert dead.options.get("retries") is None  # `throws`: not retried


def test_waiting_work_gives_up_after_bounded_reschedules(
    make_cluster: Callable[..., StubCluster],
) -> None:
    cluster = make_cluster(forwarding=False)
    app, store = cluster.app, cluster.store
    (holder,) = store.create_tasks([("reindex", "alpha", {"dest": "beta"})])
    assert isinstance(store.begin_reindex(holder, "alpha", "beta", 4, 60), list)
    blocked = app.upsert("alpha", [("a", "text a")])
    cluster.drain()  # three reschedules, then it gives up
    task = store.task(blocked)
    assert task is not None
    assert task.status == "failed"
    assert task.attempts == 4  # three reschedules, then the last try
    assert task.error == (
        f"gave up after 3 reschedules: model 'alpha' is locked by reindex #{holder}"
    )


def test_messages_waiting_at_boot_meet_an_open_processor(settings: Settings) -> None:
    """The processor opens before any worker thread takes a message."""
    broker = StubBroker(fail_fast_default=False)
    raised: list[BaseException] = []

    class Spy(dramatiq.Middleware):
        def after_process_message(
            self,
            broker: object,
            message: object,
            *,
            result: object = None,
            exception: BaseException | None = None,
        ) -> None:
            if exception is not None:
                raised.append(exception)

    broker.add_middleware(Spy())
    app = build_app(settings, broker)
    app.store.create_model("alpha", "hashing:dim=64")
    ids = app.submit(
        [
            ("upsert", "alpha", {"items": [{"id": f"i{n}", "text": "t"}]})
            for n in range(64)
        ]
    )
    worker = dramatiq.Worker(broker, worker_threads=16, worker_timeout=20)
    worker.start()
    try:
        for queue in app.queues:
            broker.join(queue)
        worker.join()
    finally:
        worker.stop()
        app.store.close()
    assert {t.status for t in app.store.tasks(ids)} == {"done"}
    assert raised == []  # no message met a missing processor (and was retried)
