"""The demo: ``python -m embindex.demo`` (from examples/embedding_index).

Uses the Redis at ``REDIS_URL`` (default redis://127.0.0.1:6379/0, under a key
namespace of its own, deleted afterwards) or, when none answers, starts its
own redis-server on a free loopback port. Then it starts worker processes,
enqueues a workload (upserts and deletes on two models, a reindex while more
writes arrive, a few bad tasks), waits until every task is done or failed,
and prints what happened: task outcomes, how keybatch batched, nearest
neighbours, and whether the reindexed model equals a rebuild from scratch.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from typing import Any

from .app import build_app, make_redis_broker
from .redis_server import RedisServer, delete_namespace, host_is_loopback, redis_answers
from .settings import Settings
from .workload import Cluster, rebuild_diff, sentences, wait_terminal


def _parse_stats(lines: list[str]) -> Counter[str]:
    total: Counter[str] = Counter()
    for line in lines:
        for part in line.split()[2:]:
            key, _, value = part.partition("=")
            if value.isdigit():
                if key == "max_batch":
                    total[key] = max(total[key], int(value))
                else:
                    total[key] += int(value)
    return total


def run(args: argparse.Namespace) -> int:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if not host_is_loopback(url):
        print(f"REDIS_URL {url} is not a loopback address; the demo stays local.")
        return 2
    server: RedisServer | None = None
    if not redis_answers(url):
        server = RedisServer()
        url = server.start()
        print(f"no Redis answered at REDIS_URL: started redis-server at {url}")
    else:
        print(f"using the Redis at {url}")
    workdir = tempfile.TemporaryDirectory(prefix="embindex-demo-")
    settings = Settings.from_env(
        redis_url=url,
        namespace=f"embindex-demo-{uuid.uuid4().hex[:8]}",
        db_path=args.db or os.path.join(workdir.name, "index.sqlite3"),
        shards=args.shards,
        chunk_size=100,
    )
    try:
        return _demo(settings, args)
    finally:
        delete_namespace(url, settings.namespace)
        if server is not None:
            server.stop()
        workdir.cleanup()


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    app = build_app(settings, make_redis_broker(settings))
    store = app.store
    store.create_model("articles", "hashing:dim=256")
    store.create_model("articles-v2", "hashing:dim=384")
    store.create_model("notes", "hashing:dim=128")
    rng = random.Random(1)
    texts = sentences(args.items, seed=1)
    notes = sentences(args.items // 4, seed=2, prefix="note: ")

    print(
        f"database {settings.db_path}; {args.processes} worker processes x"
        f" {settings.threads} threads; shards {settings.shards}"
    )
    cluster = Cluster(settings, args.processes)
    started = time.monotonic()
    cluster.start()
    print(f"workers ready in {time.monotonic() - started:.1f}s")

    def chunks(model: str, items: list[tuple[str, str]]) -> list[Any]:
        specs, at = [], 0
        while at < len(items):
            size = rng.randint(1, 5)
            batch = items[at : at + size]
            at += size
            payload = {"items": [{"id": i, "text": t} for i, t in batch]}
            specs.append(("upsert", model, payload))
        return specs

    articles = [(f"a{n}", t) for n, t in enumerate(texts)]
    first = chunks("articles", articles[: len(articles) * 3 // 4])
    first += chunks("notes", [(f"n{n}", t) for n, t in enumerate(notes)])
    rng.shuffle(first)
    bad = [
        ("upsert", "no-such-model", {"items": [{"id": "x", "text": "hello"}]}),
        ("upsert", "articles", {"items": [{"id": "x", "text": "   "}]}),
        (
            "upsert",
            "notes",
            {"items": [{"id": f"x{n}", "text": "t"} for n in range(1001)]},
        ),
        ("reindex", "articles", {"dest": "articles"}),
    ]
    start = time.monotonic()
    ids = app.submit(first + bad)
    app.dispatch("upsertion_worker", 10**9, "articles")  # a task id that does not exist
    print(f"phase 1: {len(first)} upsert tasks + {len(bad)} bad ones enqueued")
    wait_terminal(store, ids, timeout=300)

    # Phase 2: a reindex of articles into articles-v2 while writes keep coming.
    reindex = app.reindex("articles", "articles-v2")
    late = chunks("articles", articles[len(articles) * 3 // 4 :])
    deleted = [f"a{n}" for n in rng.sample(range(len(articles) * 3 // 4), 40)]
    late += [
        ("delete", "articles", {"ids": deleted[i : i + 10]}) for i in range(0, 40, 10)
    ]
    late += chunks("articles", [("a1", "the rewritten first article about comets")])
    ids += [reindex, *app.submit(late)]
    print(
        f"phase 2: reindex #{reindex} articles -> articles-v2, with {len(late)} more"
        " writes to articles arriving meanwhile"
    )
    wait_terminal(store, timeout=300)
    elapsed = time.monotonic() - start
    cluster.stop()
    stats = _parse_stats(cluster.stats)

    counts = store.status_counts()
    print(
        f"\nall {sum(counts.values())} tasks settled in {elapsed:.1f}s: {dict(counts)}"
    )
    done_tasks = stats["batched_tasks"]
    if stats["batches"]:
        print(
            f"keybatch: {done_tasks} upsert/delete tasks in {stats['batches']} batches"
            f" (mean {done_tasks / stats['batches']:.1f}, max {stats['max_batch']}),"
            f"; {stats['embed_calls']} embedding calls in all for"
            f" {stats['embedded_texts']} texts (batches, forwarded copies and"
            f" {stats['chunks_done']} reindex chunks)"
        )
    print("failed tasks, each with its reason:")
    for task in store.tasks():
        if task.status in ("failed", "refused"):
            print(f"  #{task.id} {task.kind} {task.model!r}: {task.error}")
    print("  (the message for task #1000000000 was logged and dropped: no such task)")
    forwarded = sum("forwarded" in (t.note or "") for t in store.tasks())
    rtask = store.task(reindex)
    assert rtask is not None
    print(
        f"reindex #{reindex}: {rtask.status}: {rtask.note};"
        f" {forwarded} writes forwarded into it"
    )

    query = "the golden comet near the harbor"
    for model in ("articles", "articles-v2"):
        print(f"nearest to {query!r} in {model}:")
        for hit in store.nearest(model, query, k=3):
            print(f"  {hit.distance:.3f}  {hit.item_id}: {hit.text}")
    diffs = rebuild_diff(store, "articles", "articles-v2")
    if diffs:
        print(f"articles-v2 differs from a rebuild from scratch: {diffs[:5]}")
        return 1
    print(
        f"articles-v2 equals a rebuild of articles from scratch"
        f" ({len(store.contents('articles-v2'))} items)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embindex.demo")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--items", type=int, default=2000, help="articles to index")
    parser.add_argument("--db", help="SQLite file (default: a temporary one)")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
