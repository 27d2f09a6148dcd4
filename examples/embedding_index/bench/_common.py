"""What the benchmark scripts share: a Redis, fresh settings, timing from the table."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from embindex import Settings, Store
from embindex.redis_server import (
    RedisServer,
    delete_namespace,
    host_is_loopback,
    redis_answers,
)


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    """REDIS_URL if a server answers there (loopback only), else a private one."""
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if not host_is_loopback(url):
        raise SystemExit(f"REDIS_URL {url} is not a loopback address")
    if redis_answers(url):
        yield url
        return
    with RedisServer() as own:
        yield own


@contextlib.contextmanager
def fresh(url: str, **changes: object) -> Iterator[Settings]:
    """Settings on a new database file and a new Redis namespace (removed after)."""
    with tempfile.TemporaryDirectory(prefix="embindex-bench-") as workdir:
        settings = dataclasses.replace(
            Settings.from_env(),
            redis_url=url,
            namespace=f"embindex-bench-{uuid.uuid4().hex[:8]}",
            db_path=os.path.join(workdir, "index.sqlite3"),
            **changes,  # type: ignore[arg-type]
        )
        try:
            yield settings
        finally:
            delete_namespace(url, settings.namespace)


def completion_span(store: Store, ids: list[int]) -> float:
    """Seconds from the first task's completion to the last one's."""
    marks = ",".join("?" * len(ids))
    first, last = (
        store.conn()
        .execute(
            f"SELECT min(updated_at), max(updated_at) FROM tasks WHERE id IN ({marks})",
            ids,
        )
        .fetchone()
    )
    return float(last - first)
