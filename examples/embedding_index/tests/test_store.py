"""The SQLite store: sqlite-vec queries, batch writes, locks, versions, GC."""

from __future__ import annotations

import time

import pytest
from embindex import Store, UnknownModel
from embindex.embedders import get_embedder
from embindex.store import Busy
from embindex.workload import rebuild_diff, sentences


def _brute_force(store: Store, model: str, text: str) -> dict[str, float]:
    """Cosine distance from ``text`` to every item, computed in Python."""
    query = get_embedder(store.model(model).embedder).embed([text])[0]
    return {
        item: 1 - sum(a * b for a, b in zip(query, vector, strict=True))
        for item, (_, vector) in store.contents(model).items()
    }


def test_nearest_neighbours_match_brute_force(store: Store) -> None:
    store.create_model("m", "hashing:dim=64")
    texts = sentences(300, seed=1)
    store.write_batch("m", {f"i{n}": t for n, t in enumerate(texts)}, [])
    hits = store.nearest("m", texts[42], k=5)
    assert hits[0].item_id == "i42"
    assert hits[0].distance == pytest.approx(0, abs=1e-6)
    for query in ("the quick fox near the moon", "golden robot paints", texts[7]):
        got = store.nearest("m", query, k=5)
        exact = _brute_force(store, "m", query)
        best = sorted(exact.values())[:5]
        # The k smallest distances, each the true distance of the item returned
        # (ties may pick different items of equal distance).
        assert [h.distance for h in got] == pytest.approx(best, abs=1e-5)
        for hit in got:
            assert hit.distance == pytest.approx(exact[hit.item_id], abs=1e-5)
            assert hit.text == texts[int(hit.item_id[1:])]


def test_write_batch_upserts_deletes_and_marks_tasks(store: Store) -> None:
    store.create_model("m", "hashing:dim=32")
    (t1, t2) = store.create_tasks([("upsert", "m", {}), ("delete", "m", {})])
    store.write_batch(
        "m", {"a": "first text", "b": "second text"}, [(t1, "2 upserted")]
    )
    store.write_batch("m", {"a": "replaced text", "b": None, "zzz": None}, [(t2, "x")])
    contents = store.contents("m")
    assert {k: v[0] for k, v in contents.items()} == {"a": "replaced text"}
    assert [t.status for t in store.tasks([t1, t2])] == ["done", "done"]
    assert rebuild_diff(store, "m", "m") == []  # stored vectors are fresh embeddings


def test_unknown_model(store: Store) -> None:
    with pytest.raises(UnknownModel, match="unknown model 'nope'"):
        store.write_batch("nope", {"a": "text"}, [])
    with pytest.raises(ValueError, match="bad model name"):
        store.create_model("no spaces", "hashing")


def test_lock_busy_expiry_and_redelivery(store: Store) -> None:
    store.create_model("s", "hashing:dim=16")
    store.create_model("d", "hashing:dim=16")
    store.create_model("e", "hashing:dim=16")
    store.write_batch("s", {f"i{n}": f"text {n}" for n in range(10)}, [])
    r1, r2 = store.create_tasks(
        [("reindex", "s", {"dest": "d"}), ("reindex", "e", {"dest": "d"})]
    )
    chunks = store.begin_reindex(r1, "s", "d", chunk_size=4, ttl=60)
    assert isinstance(chunks, list)
    assert len(chunks) == 3
    assert store.begin_reindex(r1, "s", "d", 4, 60) == chunks  # redelivered: same work
    assert store.begin_reindex(r2, "e", "d", 4, 60) == Busy("d", r1)
    # The holder crashes: its lock expires, the next reindex breaks it.
    store.conn().execute("UPDATE reindex_locks SET expires_at = ?", (time.time() - 1,))
    assert isinstance(store.begin_reindex(r2, "e", "d", 4, 60), list)
    first = store.task(r1)
    assert first is not None
    assert first.status == "failed"
    assert "expired" in (first.error or "")
    assert all(t.status == "failed" for t in store.tasks(chunks))
    assert len([t for t in store.vec_tables() if t.startswith("vec_2_")]) == 2


def test_forwarded_write_beats_an_older_chunk_read(store: Store) -> None:
    store.create_model("s", "hashing:dim=16")
    store.create_model("d", "hashing:dim=24")
    store.write_batch("s", {"a": "old a", "b": "old b", "c": "old c"}, [])
    (reindex,) = store.create_tasks([("reindex", "s", {"dest": "d"})])
    chunks = store.begin_reindex(reindex, "s", "d", chunk_size=10, ttl=60)
    assert isinstance(chunks, list)
    (chunk,) = store.tasks(chunks)
    lock, rows = store.chunk_rows(chunk)  # the chunk reads the old texts...
    assert lock is not None
    assert len(rows) == 3
    # ...then upserts and deletes arrive, and are forwarded into the staging index
    result = store.write_batch("s", {"a": "new a", "b": None, "n": "new n"}, [])
    assert result["forwarded"] == reindex
    vectors = get_embedder("hashing:dim=24").embed([t for _, t, _ in rows])
    assert store.write_chunk(chunk, rows, vectors, ttl=60) == 0  # the last chunk
    assert store.finish_reindex(reindex) is not None
    assert store.lock_of("s") is None
    assert store.lock_of("d") is None
    assert rebuild_diff(store, "s", "d") == []
    assert {k: v[0] for k, v in store.contents("d").items()} == {
        "a": "new a",
        "c": "old c",
        "n": "new n",
    }
    dropped = store.gc()
    assert dropped == ["vec_2_1"]
    assert store.finish_reindex(reindex) is None  # idempotent
