"""End to end on the real Redis at REDIS_URL: worker processes
(``python -m embindex.worker``), Dramatiq's Redis broker, shard queues, a
kill -9 in the middle. Each test has a Redis key namespace of its own."""

from __future__ import annotations

import dataclasses
import time

from embindex import Settings, Store
from embindex.app import build_app, make_redis_broker
from embindex.workload import Cluster, rebuild_diff, sentences, wait_terminal


def _producer(settings: Settings) -> tuple[Store, object]:
    app = build_app(settings, make_redis_broker(settings))
    app.store.create_model("alpha", "hashing:dim=64")
    app.store.create_model("beta", "hashing:dim=48")
    return app.store, app


def test_two_worker_processes(redis_settings: Settings) -> None:
    store, app = _producer(redis_settings)
    texts = sentences(200, seed=6)
    specs = [
        ("upsert", "alpha", {"items": [{"id": f"a{n}", "text": t}]})
        for n, t in enumerate(texts)
    ] + [
        ("upsert", "beta", {"items": [{"id": f"b{n}", "text": t}]})
        for n, t in enumerate(texts[:50])
    ]
    bad = [
        ("upsert", "ghost", {"items": [{"id": "x", "text": "t"}]}),
        ("upsert", "alpha", {"items": [{"id": "x", "text": ""}]}),
        ("reindex", "alpha", {"dest": "alpha"}),
    ]
    with Cluster(redis_settings, processes=2) as cluster:
        ids = app.submit(specs + bad)  # type: ignore[attr-defined]
        wait_terminal(store, ids, timeout=60)
        deleted = app.delete("alpha", [f"a{n}" for n in range(0, 200, 5)])  # type: ignore[attr-defined]
        reindex = app.reindex("alpha", "beta")  # type: ignore[attr-defined]
        wait_terminal(store, timeout=60)
    assert len(cluster.stats) == 2  # both processes stopped gracefully
    statuses = {t.id: (t.status, t.error) for t in store.tasks()}
    assert [statuses[i][0] for i in ids[:250]] == ["done"] * 250
    assert [statuses[i] for i in ids[250:]] == [
        ("failed", "unknown model 'ghost'"),
        ("failed", "item 'x': empty text"),
        ("failed", "cannot reindex model 'alpha' onto itself"),
    ]
    assert statuses[deleted] == ("done", None)
    assert statuses[reindex] == ("done", None)
    assert len(store.contents("alpha")) == 160
    assert rebuild_diff(store, "alpha", "beta") == []
    assert store.nearest("beta", texts[11], k=1)[0].item_id == "a11"


def test_kill_9_loses_nothing(redis_settings: Settings) -> None:
    # A slow embedder keeps messages in flight when the worker dies.
    settings = dataclasses.replace(redis_settings, shards=1, window=0.05)
    store, app = _producer(settings)
    store.create_model("slow", "hashing:dim=32,call_ms=40")
    texts = sentences(300, seed=7)
    cluster = Cluster(settings, processes=1).start()
    try:
        ids = app.submit(  # type: ignore[attr-defined]
            [
                ("upsert", "slow", {"items": [{"id": f"s{n}", "text": t}]})
                for n, t in enumerate(texts)
            ]
        )
        deadline = time.monotonic() + 30
        while store.status_counts().get("done", 0) < 30:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        cluster.kill(0)
        done_at_kill = store.status_counts().get("done", 0)
        cluster.start_one(0)  # a supervisor restarts it; Redis redelivers
        wait_terminal(store, ids, timeout=60)
    finally:
        cluster.stop()
    assert done_at_kill < 300
    assert {t.status for t in store.tasks(ids)} == {"done"}
    assert {k: v[0] for k, v in store.contents("slow").items()} == {
        f"s{n}": t for n, t in enumerate(texts)
    }
    assert rebuild_diff(store, "slow", "slow") == []
