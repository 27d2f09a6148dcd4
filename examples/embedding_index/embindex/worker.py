"""Run one worker process: ``python -m embindex.worker --shards 0,2``.

Settings come from the environment (`Settings.from_env`: ``EI_DB``,
``REDIS_URL``, ...). The process consumes the shard queues it is given (or
``--index I --processes P``: every shard ``s`` with ``s % P == I``), on
``EI_THREADS`` Dramatiq worker threads sharing one keybatch processor. It
prints ``ready`` once the processor is open, and stops gracefully on SIGTERM
or SIGINT (messages in progress finish, the processor drains).

Dramatiq's own CLI works as well: ``dramatiq embindex.cli --queues index.0``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

import dramatiq

from .app import build_app, make_redis_broker, shards_of_process
from .settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embindex.worker")
    parser.add_argument("--shards", help="comma-separated shard numbers")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--log-level", default=os.environ.get("EI_LOG", "WARNING"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s worker[{os.getpid()}] %(name)s %(levelname)s %(message)s",
    )
    settings = Settings.from_env()
    if args.shards:
        shards = [int(s) for s in args.shards.split(",") if s.strip()]
    else:
        shards = shards_of_process(args.index, args.processes, settings.shards)
    app = build_app(settings, make_redis_broker(settings))
    app.broker.emit_after("process_boot")
    worker = dramatiq.Worker(
        app.broker,
        queues=app.queues_for(shards),
        worker_threads=settings.threads,
        worker_timeout=200,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker.start()
    print(f"ready pid={os.getpid()} shards={shards}", flush=True)
    stop.wait()
    worker.stop()
    app.broker.close()
    app.store.close()
    stats = " ".join(f"{k}={v}" for k, v in sorted(app.service.stats.items()))
    print(f"stopped pid={os.getpid()} {stats}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
