"""Fixtures: a fresh database per test, a Dramatiq StubBroker worker, real Redis.

Tests import `embindex` from the example's folder wherever pytest runs from.
The Redis tests use ``REDIS_URL`` (default redis://127.0.0.1:6379/0) under a
key namespace of their own, deleted afterwards; when no server answers there
they start a private redis-server on a free loopback port; with neither, they
skip locally and fail in CI (CI is set).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dramatiq
from dramatiq.brokers.stub import StubBroker
from embindex import App, Settings, Store, build_app
from embindex.redis_server import RedisServer, delete_namespace, redis_answers


def pytest_configure(config: pytest.Config) -> None:
    # The example's own marker; warnings of third parties seen under -W error.
    config.addinivalue_line("markers", "redis: needs the Redis server at REDIS_URL")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        db_path=str(tmp_path / "index.sqlite3"),
        shards=2,
        window=0.01,
        reschedule_delay=0.02,
        reschedule_attempts=3,
        chunk_size=4,
        max_items_per_task=50,
        threads=16,
        save_timeout=30.0,
        exclusive_timeout=5.0,
    )


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    db = Store(settings.db_path)
    db.init()
    yield db
    db.close()


class StubCluster:
    """An App on Dramatiq's StubBroker with a worker running in this process."""

    def __init__(self, settings: Settings) -> None:
        self.broker = StubBroker(fail_fast_default=False)
        self.broker.emit_after("process_boot")
        self.app: App = build_app(settings, self.broker)
        self.worker = dramatiq.Worker(
            self.broker, worker_threads=settings.threads, worker_timeout=20
        )
        self.worker.start()

    @property
    def store(self) -> Store:
        return self.app.store

    def drain(self) -> None:
        """Wait until every message (delayed ones too) was processed."""
        while True:
            for queue in self.app.queues:
                self.broker.join(queue, timeout=60_000)
            self.worker.join()
            if not any(
                self.broker.queues[q].unfinished_tasks for q in self.broker.queues
            ):
                return

    def dead_letters(self) -> list[dramatiq.MessageProxy]:
        return self.broker.dead_letters

    def stop(self) -> None:
        self.worker.stop()
        self.broker.close()
        self.app.store.close()


@pytest.fixture
def cluster(settings: Settings) -> Iterator[StubCluster]:
    running = StubCluster(settings)
    running.store.create_model("alpha", "hashing:dim=64")
    running.store.create_model("beta", "hashing:dim=32")
    yield running
    running.stop()


@pytest.fixture
def make_cluster(settings: Settings) -> Iterator[Callable[..., StubCluster]]:
    """Start a `StubCluster` on the test's settings with some changed."""
    made: list[StubCluster] = []

    def make(**changes: object) -> StubCluster:
        running = StubCluster(dataclasses.replace(settings, **changes))
        running.store.create_model("alpha", "hashing:dim=64")
        running.store.create_model("beta", "hashing:dim=32")
        made.append(running)
        return running

    yield make
    for running in made:
        running.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The Redis at REDIS_URL; when none answers there, a private redis-server
    on a free loopback port (Debian's package); without either, skip locally
    and fail in CI."""
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if redis_answers(url):
        yield url
        return
    if shutil.which("redis-server") or os.path.exists("/usr/bin/redis-server"):
        with RedisServer() as own:
            yield own
        return
    if os.environ.get("CI"):
        pytest.fail(f"no Redis at {url} and no redis-server to start (CI needs one)")
    pytest.skip(f"no Redis server at {url} and no redis-server installed")


@pytest.fixture
def redis_settings(settings: Settings, redis_url: str) -> Iterator[Settings]:
    """Settings on the real Redis, under a namespace of their own (cleaned up)."""
    namespace = f"embindex-test-{uuid.uuid4().hex[:12]}"
    yield dataclasses.replace(
        settings,
        redis_url=redis_url,
        namespace=namespace,
        heartbeat_timeout_ms=2000,
        maintenance_chance=200_000,
    )
    delete_namespace(redis_url, namespace)
