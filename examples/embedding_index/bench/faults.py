"""Faults: kill -9 a worker mid-run; a reindex while upserts and deletes arrive.

    python bench/faults.py [--tasks 3000] [--items 3000] [--kill-during-reindex]

Scenario 1, kill -9: two worker processes; a slow embedder (20 ms a call)
keeps messages in flight; a worker is killed with SIGKILL once 30% of the
tasks are done, and restarted a second later (as a supervisor would). Redis
gives the dead worker's unacknowledged messages back after the heartbeat
timeout (3 s here). Then the same again in a second phase of deletes,
re-upserts of the same items (idempotent) and duplicate messages. Checked:
every task ends done or failed with its reason, the index holds exactly the
expected items, and every stored vector equals a fresh embedding.

Scenario 2, reindex under writes: source model S with ``--items`` items is
reindexed into D (chunks of 100, D's embedder slowed to 30 ms a call) while a
producer keeps sending upserts (new and existing items) and deletes to S
until the reindex ends. Checked: D equals a rebuild of S from scratch, except
for items written after the swap (which a reindex need not carry).
``--kill-during-reindex`` also kills -9 the worker running the reindex in the
middle of it.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from typing import Any

from _common import fresh, redis_url
from embindex.app import build_app, make_redis_broker
from embindex.workload import Cluster, rebuild_diff, sentences, wait_terminal

import keybatch

FAULT_SETTINGS: dict[str, Any] = {
    "heartbeat_timeout_ms": 3000,
    "maintenance_chance": 100_000,
    "shards": 2,
    "threads": 32,
}


def _report_tasks(app: Any, ids: list[int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for task in app.store.tasks(ids):
        counts[task.status] = counts.get(task.status, 0) + 1
        if task.status not in ("done", "failed", "refused"):
            raise AssertionError(f"task left open: {task}")
        if task.status != "done":
            print(f"    #{task.id} {task.status}: {task.error}")
    return counts


def _wait_done(app: Any, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while app.store.status_counts().get("done", 0) < count:
        if time.monotonic() > deadline:
            raise TimeoutError("not enough tasks done")
        time.sleep(0.02)


def kill_scenario(url: str, args: argparse.Namespace) -> bool:
    print("scenario 1: kill -9 a worker mid-run (2 processes, heartbeat timeout 3 s)")
    with fresh(url, **FAULT_SETTINGS) as settings:
        app = build_app(settings, make_redis_broker(settings))
        # one model per shard, so each process owns one
        models = []
        for n in range(100):
            name = f"model-{n}"
            if keybatch.worker_for_key(name, 2) == len(models):
                models.append(name)
            if len(models) == 2:
                break
        for model in models:
            app.store.create_model(model, "hashing:dim=128,call_ms=20")
        texts = sentences(args.tasks, seed=31)
        specs = [
            ("upsert", models[n % 2], {"items": [{"id": f"i{n}", "text": t}]})
            for n, t in enumerate(texts)
        ]
        cluster = Cluster(settings, processes=2).start()
        try:
            ids = app.submit(specs)
            _wait_done(app, len(ids) * 3 // 10)
            pid = cluster.kill(0)
            killed_at = time.monotonic()
            done = app.store.status_counts().get("done", 0)
            print(
                f"  phase 1: killed worker pid {pid} with {done}/{len(ids)} tasks done"
            )
            time.sleep(1.0)
            cluster.start_one(0)
            wait_terminal(app.store, ids, timeout=300)
            print(
                f"  all phase 1 tasks settled {time.monotonic() - killed_at:.1f}s after"
            )
            print(f"  phase 1 outcomes: {_report_tasks(app, ids)}")

            # Phase 2: deletes, re-upserts of the same items, duplicate messages.
            rng = random.Random(32)
            gone = set(rng.sample(range(args.tasks), args.tasks // 10))
            again = [
                n
                for n in rng.sample(range(args.tasks), args.tasks // 5)
                if n not in gone
            ]
            phase2 = [
                ("delete", models[n % 2], {"ids": [f"i{n}"]}) for n in sorted(gone)
            ] + [
                (
                    "upsert",
                    models[n % 2],
                    {"items": [{"id": f"i{n}", "text": texts[n]}]},
                )
                for n in again
            ]
            ids2 = app.submit(phase2)
            for task_id in ids[:200]:  # the same messages once more
                app.dispatch("upsertion_worker", task_id, app.store.task(task_id).model)
            _wait_done(app, len(ids) + len(ids2) // 3)
            pid = cluster.kill(1)
            done = app.store.status_counts().get("done", 0) - len(ids)
            print(
                f"  phase 2: killed worker pid {pid} with {done}/{len(ids2)} tasks done"
            )
            time.sleep(1.0)
            cluster.start_one(1)
            wait_terminal(app.store, ids2, timeout=300)
            print(f"  phase 2 outcomes: {_report_tasks(app, ids2)}")
        finally:
            cluster.stop()
        redelivered = sum(
            int(part.split("=")[1])
            for line in cluster.stats
            for part in line.split()
            if part.startswith("redelivered=")
        )
        expected = {f"i{n}": t for n, t in enumerate(texts) if n not in gone}
        actual: dict[str, str] = {}
        for model in models:
            actual.update({k: v[0] for k, v in app.store.contents(model).items()})
            assert rebuild_diff(app.store, model, model) == [], model
        lost = len(set(expected) - set(actual))
        extra = len(set(actual) - set(expected))
        wrong = sum(actual.get(k) != v for k, v in expected.items() if k in actual)
        ok = lost == extra == wrong == 0
        print(
            f"  index: {len(actual)} items, expected {len(expected)}: lost {lost},"
            f" extra {extra}, wrong text {wrong}; stored vectors = fresh embeddings;"
            f" {redelivered} redelivered messages of done tasks skipped"
            f" (by the restarted and surviving workers)"
        )
        app.store.close()
        return ok


def reindex_scenario(url: str, args: argparse.Namespace) -> bool:
    print(
        f"scenario 2: reindex S -> D while upserts and deletes arrive"
        f"{' (and kill -9 mid-reindex)' if args.kill_during_reindex else ''}"
    )
    with fresh(url, chunk_size=100, **FAULT_SETTINGS) as settings:
        app = build_app(settings, make_redis_broker(settings))
        app.store.create_model("S", "hashing:dim=128")
        app.store.create_model("D", "hashing:dim=192,call_ms=30")
        texts = sentences(args.items, seed=41)
        app.store.write_batch("S", {f"i{n}": t for n, t in enumerate(texts)}, [])
        cluster = Cluster(settings, processes=2).start()
        owner = keybatch.worker_for_key("S", settings.shards) % 2
        stop = threading.Event()
        sent: list[int] = []

        def produce() -> None:
            rng = random.Random(42)
            fresh_id = args.items
            while not stop.is_set():
                roll = rng.random()
                if roll < 0.4:
                    spec = (
                        "upsert",
                        "S",
                        {
                            "items": [
                                {"id": f"i{fresh_id}", "text": f"new item {fresh_id}"}
                            ]
                        },
                    )
                    fresh_id += 1
                elif roll < 0.7:
                    n = rng.randrange(fresh_id)
                    spec = (
                        "upsert",
                        "S",
                        {
                            "items": [
                                {
                                    "id": f"i{n}",
                                    "text": f"rewritten {n} at {rng.random():.6f}",
                                }
                            ]
                        },
                    )
                else:
                    n = rng.randrange(fresh_id)
                    spec = ("delete", "S", {"ids": [f"i{n}"]})
                sent.extend(app.submit([spec]))
                time.sleep(0.005)

        try:
            reindex = app.reindex("S", "D")
            producer = threading.Thread(target=produce)
            producer.start()
            if args.kill_during_reindex:
                deadline = time.monotonic() + 120
                while True:
                    chunks = [t for t in app.store.tasks() if t.parent == reindex]
                    if (
                        chunks
                        and sum(t.status == "done" for t in chunks) >= len(chunks) // 3
                    ):
                        break
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                cluster.kill(owner)
                print(
                    f"  killed the reindexing worker (process {owner})"
                    " at 1/3 of the chunks"
                )
                time.sleep(1.0)
                cluster.start_one(owner)
            wait_terminal(app.store, [reindex], timeout=600)
            stop.set()
            producer.join()
            wait_terminal(app.store, timeout=300)
        finally:
            stop.set()
            cluster.stop()
        task = app.store.task(reindex)
        assert task is not None
        print(f"  reindex #{reindex}: {task.status}: {task.note or task.error}")
        swap_time = (
            app.store.conn()
            .execute("SELECT updated_at FROM tasks WHERE id = ?", (reindex,))
            .fetchone()[0]
        )
        after = set()
        forwarded = 0
        for t in app.store.tasks(sent):
            assert t.status == "done", t
            forwarded += "forwarded" in (t.note or "")
            touched = [i["id"] for i in t.payload.get("items", [])] + t.payload.get(
                "ids", []
            )
            if (
                app.store.conn()
                .execute("SELECT updated_at FROM tasks WHERE id = ?", (t.id,))
                .fetchone()[0]
                >= swap_time
            ):
                after.update(touched)
        diffs = rebuild_diff(app.store, "S", "D")
        unexplained = [d for d in diffs if d.split(":")[0] not in after]
        chunks = [t for t in app.store.tasks() if t.parent == reindex]
        print(
            f"  {len(sent)} writes to S during the run: {forwarded} forwarded into the"
            f" reindex, {len(after)} items written after the swap;"
            f" {sum(c.status == 'done' for c in chunks)}/{len(chunks)} chunks done"
        )
        print(
            f"  D vs a rebuild of S from scratch: {len(diffs)} differences,"
            f" {len(diffs) - len(unexplained)} of them items written after the swap,"
            f" {len(unexplained)} unexplained"
        )
        for line in unexplained[:10]:
            print(f"    {line}")
        app.store.close()
        return task.status == "done" and not unexplained


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--kill-during-reindex", action="store_true")
    parser.add_argument("--scenario", choices=["1", "2", "both"], default="both")
    args = parser.parse_args()
    ok = True
    with redis_url() as url:
        if args.scenario in ("1", "both"):
            ok &= kill_scenario(url, args)
        if args.scenario in ("2", "both"):
            ok &= reindex_scenario(url, args)
    print("OK" if ok else "FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
