"""Upserts/s: keybatch batching against one task = one embedding call + one
transaction, on the same workers and the same data; 1 and 2 worker processes.

    python bench/throughput.py [--tasks 4000] [--embedder hashing:dim=256]

Each configuration gets a fresh database and Redis namespace. The messages
are enqueued first, then the workers start; the rate is tasks over the span
from the first task's completion to the last one's (the task table's
timestamps), so worker start-up and enqueueing are not counted. Every task
upserts one item (a new id).
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import completion_span, fresh, redis_url
from embindex.app import build_app, make_redis_broker
from embindex.workload import Cluster, rebuild_diff, sentences, wait_terminal

import keybatch


def balanced_models(count: int, shards: int) -> list[str]:
    """``count`` model names whose shard queues are spread evenly."""
    chosen: list[str] = []
    per_shard = [0] * shards
    candidate = 0
    while len(chosen) < count:
        name = f"model-{candidate}"
        shard = keybatch.worker_for_key(name, shards)
        if per_shard[shard] == min(per_shard):
            per_shard[shard] += 1
            chosen.append(name)
        candidate += 1
    return chosen


def one_run(
    url: str, args: argparse.Namespace, processes: int, batching: bool
) -> dict[str, float]:
    with fresh(
        url, batching=batching, shards=args.shards, threads=args.threads
    ) as settings:
        app = build_app(settings, make_redis_broker(settings))
        models = balanced_models(args.models, settings.shards)
        for model in models:
            app.store.create_model(model, args.embedder)
        texts = sentences(args.tasks, seed=11)
        ids = app.submit(
            [
                (
                    "upsert",
                    models[n % len(models)],
                    {"items": [{"id": f"i{n}", "text": t}]},
                )
                for n, t in enumerate(texts)
            ]
        )
        cluster = Cluster(settings, processes)
        cluster.start()
        wait_terminal(app.store, ids, timeout=1800, interval=0.1)
        cluster.stop()
        span = completion_span(app.store, ids)
        counts = app.store.status_counts()
        assert counts == {"done": len(ids)}, counts
        for model in models:
            assert not rebuild_diff(app.store, model, model)
        stats: dict[str, float] = {}
        for line in cluster.stats:
            for part in line.split()[2:]:
                key, _, value = part.partition("=")
                stats[key] = stats.get(key, 0) + float(value)
        app.store.close()
        return {"rate": len(ids) / span, "span": span, **stats}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--embedder", default="hashing:dim=256")
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument(
        "--models", type=int, default=4, help="models, spread over shards"
    )
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--processes", default="1,2")
    args = parser.parse_args()
    print(
        f"{args.tasks} upsert tasks of one item over {args.models} models,"
        f" embedder {args.embedder}, {args.threads} Dramatiq threads per process"
    )
    print(
        f"{'processes':>9} {'mode':>14} {'tasks/s':>9} {'batches':>8}"
        f" {'embed calls':>11}"
    )
    with redis_url() as url:
        for processes in [int(p) for p in args.processes.split(",")]:
            for batching in (True, False):
                runs = [
                    one_run(url, args, processes, batching) for _ in range(args.repeat)
                ]
                rate = statistics.median(r["rate"] for r in runs)
                mode = "keybatch" if batching else "1 task = 1 txn"
                batches = runs[0].get("batches", 0)
                calls = runs[0].get("embed_calls", 0)
                print(
                    f"{processes:>9} {mode:>14} {rate:>9.0f} {batches:>8.0f}"
                    f" {calls:>11.0f}"
                )
                time.sleep(0.5)


if __name__ == "__main__":
    main()
