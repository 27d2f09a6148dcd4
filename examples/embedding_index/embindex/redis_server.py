"""Find Redis at a URL, or start a private redis-server on a free loopback port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from urllib.parse import urlsplit

import redis

__all__ = ["RedisServer", "free_port", "redis_answers"]


def redis_answers(url: str, timeout: float = 0.5) -> bool:
    """True when a Redis server answers PING at ``url``."""
    client = redis.Redis.from_url(
        url, socket_connect_timeout=timeout, socket_timeout=timeout
    )
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    finally:
        client.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server child bound to 127.0.0.1 that keeps nothing on disk.

    ``with RedisServer() as url:`` starts it on a free port and stops it on exit.
    """

    def __init__(self, executable: str | None = None) -> None:
        found = executable or shutil.which("redis-server") or "/usr/bin/redis-server"
        self.executable = found
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="embindex-redis-")

    def start(self, timeout: float = 10.0) -> str:
        self._process = subprocess.Popen(
            [
                self.executable,
                "--bind", "127.0.0.1",
                "--port", str(self.port),
                "--save", "",
                "--appendonly", "no",
                "--dir", self._dir.name,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not redis_answers(self.url, 0.2):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)
        return self.url

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        self._dir.cleanup()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def host_is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in {"localhost", "::1"} or host.startswith("127.")


def delete_namespace(url: str, namespace: str) -> int:
    """Delete every key under ``namespace:`` (what a test or demo run left)."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        return int(client.delete(*keys)) if keys else 0
    finally:
        client.close()
