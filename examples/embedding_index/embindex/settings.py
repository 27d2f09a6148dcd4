"""Settings of the embedding-index workers, read from the environment.

Every knob the issue names is here: forwarding, waiting, the reschedule delay
and attempts, the reindex chunk size; plus where things live (the SQLite file,
Redis) and how keybatch batches (window, batch cap).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

__all__ = ["Settings"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{name} must be a boolean (1/0, true/false), got {value!r}")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Configuration of producers and workers (one instance per process).

    Attributes:
        db_path: The SQLite database file (tasks, items, vectors, locks).
        redis_url: The Redis broker (loopback by default).
        namespace: Prefix of every Redis key Dramatiq writes.
        shards: Number of shard queues ``index.0 .. index.{shards-1}``.
        forwarding: An upsert or delete of a model under reindex is applied
            and also forwarded into the reindex's destination. Off: it waits
            (when ``waiting``) or is refused.
        waiting: Work that meets a reindex lock is rescheduled (bounded by
            ``reschedule_attempts``); off: it is refused at once.
        reschedule_delay: Seconds before a rescheduled task runs again.
        reschedule_attempts: Reschedules before a task fails for good.
        chunk_size: Items per reindex subtask.
        max_items_per_task: Larger upsert/delete tasks fail as oversized.
        max_text_chars: Longer texts fail the task.
        lock_ttl: Seconds a reindex lock lives without renewal (a crashed
            holder's lock expires after this).
        exclusive_timeout: Seconds a reindex waits for the in-process
            ``processor.exclusive`` on its models before it counts them busy.
        batching: Batch upserts/deletes through keybatch (off: one task = one
            embedding call + one transaction, the benchmark's baseline).
        window: keybatch ``min_duration``: seconds a batch stays open.
        max_batch_ops: keybatch ``max_ops``: tasks per batch at most.
        save_timeout: keybatch ``max_duration``: load + embed + save deadline.
        processor_workers: keybatch worker tasks per process.
        threads: Dramatiq worker threads per process (concurrent tasks).
        synchronous: SQLite ``PRAGMA synchronous`` (NORMAL: WAL commits are
            not fsynced one by one; FULL: every commit is).
        heartbeat_timeout_ms: Dramatiq Redis broker: silence after which a
            worker counts as dead and its unacknowledged messages go back.
        maintenance_chance: Dramatiq Redis broker: per million commands, how
            many also run that maintenance.
    """

    db_path: str = "embedding_index.sqlite3"
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "embindex"
    shards: int = 4
    forwarding: bool = True
    waiting: bool = True
    reschedule_delay: float = 1.0
    reschedule_attempts: int = 10
    chunk_size: int = 256
    max_items_per_task: int = 1000
    max_text_chars: int = 10_000
    lock_ttl: float = 120.0
    exclusive_timeout: float = 30.0
    batching: bool = True
    window: float = 0.02
    max_batch_ops: int = 256
    save_timeout: float = 300.0
    processor_workers: int = 8
    threads: int = 32
    synchronous: str = "NORMAL"
    heartbeat_timeout_ms: int = 60_000
    maintenance_chance: int = 1000

    def __post_init__(self) -> None:
        for name in ("shards", "reschedule_attempts", "chunk_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_items_per_task < 1 or self.max_batch_ops < 1:
            raise ValueError("max_items_per_task and max_batch_ops must be >= 1")
        if self.synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError("synchronous must be OFF, NORMAL, FULL or EXTRA")
        if self.reschedule_delay < 0 or self.window < 0 or self.lock_ttl <= 0:
            raise ValueError("delays must be >= 0 and lock_ttl > 0")

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: object
    ) -> Settings:
        """Read ``EI_*`` variables (and ``REDIS_URL``); ``overrides`` win.

        The variable of a field is ``EI_`` + its name in capitals
        (``EI_CHUNK_SIZE``); the Redis URL is ``REDIS_URL``.
        """
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            var = (
                "REDIS_URL" if field.name == "redis_url" else f"EI_{field.name.upper()}"
            )
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            default = field.default
            if isinstance(default, bool):
                values[field.name] = _bool(raw, var)
            elif isinstance(default, int):
                values[field.name] = int(raw)
            elif isinstance(default, float):
                values[field.name] = float(raw)
            else:
                values[field.name] = raw
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        env: dict[str, str] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            var = (
                "REDIS_URL" if field.name == "redis_url" else f"EI_{field.name.upper()}"
            )
            env[var] = (
                ("1" if value else "0") if isinstance(value, bool) else str(value)
            )
        return env
