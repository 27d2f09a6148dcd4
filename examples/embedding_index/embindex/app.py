"""The Dramatiq side: broker, the four async actors, routing, producers.

`build_app(settings, broker)` declares the actors on a broker (Redis in
production, Dramatiq's StubBroker in tests) with Dramatiq's AsyncIO middleware
and `KeybatchMiddleware`, which opens one keybatch processor per worker
process when the worker boots and closes it (draining) at shutdown.

Key-affine routing: every message goes to the shard queue
``index.{keybatch.worker_for_key(model, shards)}``, so all the work of one
model meets in the worker process that consumes that shard, and its batches
stay large. A worker process consumes a set of shards (`queues_for`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import dramatiq
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.middleware import AsyncIO, Middleware

import keybatch

from .service import IndexService, ReindexRefused
from .settings import Settings
from .store import Store

__all__ = [
    "App",
    "KeybatchMiddleware",
    "build_app",
    "make_redis_broker",
    "queue_for",
    "shards_of_process",
]

log = logging.getLogger("embindex")

ACTORS = ("upsertion_worker", "deletion_worker", "reindex_worker", "reindex_subworker")


def queue_for(model: str, shards: int) -> str:
    """The shard queue of a model: ``index.{worker_for_key(model, shards)}``."""
    return f"index.{keybatch.worker_for_key(model, shards)}"


def shards_of_process(index: int, processes: int, shards: int) -> list[int]:
    """The shards worker process ``index`` of ``processes`` consumes."""
    if not 0 <= index < processes:
        raise ValueError("index must be in [0, processes)")
    return [shard for shard in range(shards) if shard % processes == index]


def make_redis_broker(settings: Settings) -> dramatiq.Broker:
    """Dramatiq's Redis broker on ``settings.redis_url``, keys under the namespace."""
    from dramatiq.brokers.redis import RedisBroker

    return RedisBroker(  # type: ignore[no-untyped-call]
        url=settings.redis_url,
        namespace=settings.namespace,
        heartbeat_timeout=settings.heartbeat_timeout_ms,
        maintenance_chance=settings.maintenance_chance,
    )


class KeybatchMiddleware(Middleware):
    """Opens the process's `IndexService` (its processor) on the actors' loop.

    ``before_worker_boot`` (after the AsyncIO middleware's, before any worker
    thread takes a message) starts ``service.running()`` on the event loop
    thread of Dramatiq's AsyncIO middleware and waits until the processor is
    open;
    ``after_worker_shutdown`` (which Dramatiq calls after the worker threads
    finished their messages, and before the AsyncIO middleware stops the loop)
    leaves it, which drains the processor.
    """

    def __init__(self, service: IndexService, *, boot_timeout: float = 30.0) -> None:
        self.service = service
        self._boot_timeout = boot_timeout
        self._future: concurrent.futures.Future[None] | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        # Before the worker threads start taking messages (and after the
        # AsyncIO middleware, earlier in the list, started the loop).
        thread = get_event_loop_thread()
        if thread is None:
            raise RuntimeError("KeybatchMiddleware needs the AsyncIO middleware first")
        self._loop = thread.loop
        ready = threading.Event()

        async def hold() -> None:
            self._stop = asyncio.Event()
            async with self.service.running():
                ready.set()
                await self._stop.wait()

        self._future = asyncio.run_coroutine_threadsafe(hold(), self._loop)
        if not ready.wait(self._boot_timeout):
            raise RuntimeError("the keybatch processor did not open in time")
        log.info("keybatch processor open")

    def before_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        """A message failed for good (retries exhausted): fail its task.

        Expected failures are recorded by the actors themselves; this catches
        the unexpected ones, so that no task stays open after its message died.
        """
        if message.actor_name not in ACTORS or not message.args:
            return
        exception = getattr(message, "_exception", None)
        if exception is not None:
            reason = f"{type(exception).__name__}: {exception}"
        else:
            lines = str(message.options.get("traceback", "")).strip().splitlines()
            reason = lines[-1] if lines else "unknown error"
        retries = message.options.get("retries", 0)
        try:
            self.service.store.finish_task(
                int(message.args[0]),
                "failed",
                error=f"{message.actor_name} gave up after {retries} retries: {reason}",
            )
        except Exception:
            log.exception("could not record the failure of %s", message)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        if self._future is None or self._loop is None:
            return
        stop = self._stop
        if stop is not None:
            self._loop.call_soon_threadsafe(stop.set)
        try:
            self._future.result(timeout=max(60.0, self.service.settings.save_timeout))
        finally:
            self._future = None
            log.info("keybatch processor closed")


@dataclasses.dataclass
class App:
    """A broker with the actors declared on it, and the service behind them."""

    settings: Settings
    broker: dramatiq.Broker
    store: Store
    service: IndexService
    actors: dict[str, dramatiq.Actor[Any, Any]]

    @property
    def queues(self) -> list[str]:
        return [f"index.{shard}" for shard in range(self.settings.shards)]

    def queues_for(self, shards: Iterable[int]) -> set[str]:
        return {f"index.{shard}" for shard in shards}

    def dispatch(
        self, actor: str, task_id: int, route: str, delay: float | None = None
    ) -> None:
        """Send ``actor(task_id)`` to the shard queue of ``route`` (a model)."""
        message = (
            self.actors[actor]
            .message(task_id)
            .copy(queue_name=queue_for(route, self.settings.shards))
        )
        self.broker.enqueue(
            message, delay=None if delay is None else max(0, int(delay * 1000))
        )

    # -- producers --------------------------------------------------------------------

    def submit(self, specs: Sequence[tuple[str, str, dict[str, Any]]]) -> list[int]:
        """Create ``(kind, model, payload)`` tasks (one transaction) and send them.

        kind is "upsert" (payload ``{"items": [{"id", "text"}]}``), "delete"
        (``{"ids": [...]}``) or "reindex" (model is the source, payload
        ``{"dest": model}``).
        """
        ids = self.store.create_tasks(specs)
        actor = {
            "upsert": "upsertion_worker",
            "delete": "deletion_worker",
            "reindex": "reindex_worker",
        }
        for task_id, (kind, model, _) in zip(ids, specs, strict=True):
            self.dispatch(actor[kind], task_id, model)
        return ids

    def upsert(self, model: str, items: Sequence[tuple[str, str]]) -> int:
        items_ = [{"id": i, "text": t} for i, t in items]
        return self.submit([("upsert", model, {"items": items_})])[0]

    def delete(self, model: str, ids: Sequence[str]) -> int:
        return self.submit([("delete", model, {"ids": list(ids)})])[0]

    def reindex(self, source: str, dest: str) -> int:
        return self.submit([("reindex", source, {"dest": dest})])[0]


def build_app(settings: Settings, broker: dramatiq.Broker) -> App:
    """Declare the shard queues and the four actors on ``broker``.

    Adds Dramatiq's AsyncIO middleware (if missing) and a `KeybatchMiddleware`
    after it. Expected failures (bad input, refused work) are recorded on the
    task and the actor returns; an unexpected exception is retried by
    Dramatiq's Retries middleware (3 times, from 1 s); `ReindexRefused` is not
    retried (``throws``).
    """
    store = Store(settings.db_path, settings.synchronous)
    store.init()
    holder: dict[str, App] = {}

    def dispatch(actor: str, task_id: int, route: str, delay: float | None) -> None:
        holder["app"].dispatch(actor, task_id, route, delay)

    service = IndexService(settings, store, dispatch)
    if not any(isinstance(m, AsyncIO) for m in broker.middleware):
        broker.add_middleware(AsyncIO())
    broker.add_middleware(KeybatchMiddleware(service))
    for shard in range(settings.shards):
        broker.declare_queue(f"index.{shard}")

    options: dict[str, Any] = {
        "max_retries": 3,
        "min_backoff": 1000,
        "max_backoff": 10_000,
    }

    async def upsertion_worker(task_id: int) -> None:
        await service.upsert(task_id)

    async def deletion_worker(task_id: int) -> None:
        await service.delete(task_id)

    async def reindex_worker(task_id: int) -> None:
        await service.reindex(task_id)

    async def reindex_subworker(task_id: int) -> None:
        await service.reindex_chunk(task_id)

    actors: dict[str, dramatiq.Actor[Any, Any]] = {}
    for fn in (upsertion_worker, deletion_worker, reindex_worker, reindex_subworker):
        extra: dict[str, Any] = (
            {"throws": (ReindexRefused,)} if fn is reindex_worker else {}
        )
        declare = dramatiq.actor(
            broker=broker,
            actor_name=fn.__name__,
            queue_name="index.0",
            **options,
            **extra,
        )
        actors[fn.__name__] = declare(fn)
    app = holder["app"] = App(settings, broker, store, service, actors)
    return app
