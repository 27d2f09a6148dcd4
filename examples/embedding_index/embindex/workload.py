"""What the demo, the benchmarks and the end-to-end tests share.

- `Cluster`: worker processes (``python -m embindex.worker``) started,
  killed, restarted and stopped.
- `sentences`: a deterministic corpus.
- `wait_terminal`: poll the task table until every task is done or failed.
- `rebuild_diff`: compare an index with a rebuild from scratch.
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from .embedders import get_embedder
from .settings import Settings
from .store import TERMINAL, Store

__all__ = ["Cluster", "rebuild_diff", "sentences", "wait_terminal"]

EXAMPLE_DIR = Path(__file__).resolve().parent.parent

_SUBJECTS = [
    "cat",
    "dog",
    "fox",
    "owl",
    "whale",
    "robot",
    "pilot",
    "baker",
    "poet",
    "comet",
    "river",
    "garden",
]
_ADJECTIVES = [
    "quick",
    "lazy",
    "brown",
    "silent",
    "golden",
    "tiny",
    "ancient",
    "bright",
    "frozen",
    "noisy",
]
_VERBS = [
    "jumps over",
    "sleeps under",
    "paints",
    "follows",
    "sings to",
    "builds",
    "watches",
]
_PLACES = ["the moon", "an old barn", "the harbor", "a library", "the desert", "a park"]


def sentences(count: int, seed: int = 0, prefix: str = "") -> list[str]:
    """``count`` short sentences, the same for the same seed."""
    rng = random.Random(seed)
    out = []
    for number in range(count):
        out.append(
            f"{prefix}the {rng.choice(_ADJECTIVES)} {rng.choice(_SUBJECTS)}"
            f" {rng.choice(_VERBS)} the {rng.choice(_ADJECTIVES)}"
            f" {rng.choice(_SUBJECTS)} near {rng.choice(_PLACES)} #{number}"
        )
    return out


class Cluster:
    """Worker processes consuming the shards of one deployment."""

    def __init__(self, settings: Settings, processes: int, log_level: str = "WARNING"):
        self.settings = settings
        self.processes = processes
        self.log_level = log_level
        self.procs: list[subprocess.Popen[str] | None] = [None] * processes
        self.stats: list[str] = []
        self._dead: list[subprocess.Popen[str]] = []
        self._stopped: list[subprocess.Popen[str]] = []
        self._readers: list[threading.Thread] = []

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.settings.to_env())
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(EXAMPLE_DIR) + (os.pathsep + path if path else "")
        env["EI_LOG"] = self.log_level
        return env

    def start_one(self, index: int, timeout: float = 60.0) -> None:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "embindex.worker",
                "--index",
                str(index),
                "--processes",
                str(self.processes),
            ],
            env=self._env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs[index] = proc
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = proc.stdout.readline()
        if not line.startswith("ready") or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"worker {index} did not start: {line!r}")

        def read(stream: object = proc.stdout) -> None:
            for text in stream:  # type: ignore[attr-defined]
                if text.startswith("stopped"):
                    self.stats.append(text.strip())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        self._readers.append(reader)

    def start(self) -> Cluster:
        for index in range(self.processes):
            self.start_one(index)
        return self

    def kill(self, index: int) -> int:
        """kill -9 a worker process; returns its pid."""
        proc = self.procs[index]
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.procs[index] = None
        self._dead.append(proc)
        return proc.pid

    def stop(self, timeout: float = 60.0) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for index, proc in enumerate(self.procs):
            if proc is None:
                continue
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self.procs[index] = None
            self._stopped.append(proc)
        for reader in self._readers:
            reader.join(5)
        self._readers.clear()
        for proc in [*self._dead, *self._stopped]:
            if proc.stdout is not None:
                proc.stdout.close()
        self._dead.clear()
        self._stopped.clear()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_terminal(
    store: Store,
    ids: Sequence[int] | None = None,
    timeout: float = 120.0,
    interval: float = 0.05,
) -> float:
    """Poll until every task (or every task in ``ids``) is done/failed/refused.

    Returns the seconds waited; raises TimeoutError with the open tasks.
    """
    start = time.monotonic()
    conn = store.conn()
    while True:
        if ids is None:
            rows = conn.execute(
                "SELECT id, status FROM tasks WHERE status NOT IN"
                " ('done', 'failed', 'refused') LIMIT 20"
            ).fetchall()
        else:
            marks = ",".join("?" * len(ids))
            rows = conn.execute(
                f"SELECT id, status FROM tasks WHERE id IN ({marks})"
                " AND status NOT IN ('done', 'failed', 'refused') LIMIT 20",
                list(ids),
            ).fetchall()
        if not rows:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"tasks still open after {timeout}s: {rows}")
        time.sleep(interval)


def rebuild_diff(
    store: Store, source: str, dest: str, tolerance: float = 1e-6
) -> list[str]:
    """Differences between ``dest``'s index and a rebuild of ``source`` from scratch.

    The rebuild embeds every item of the source's live index with the
    destination's embedder. Empty list: equal (same ids, same texts, vectors
    within ``tolerance``).
    """
    expected_texts = {item: text for item, (text, _) in store.contents(source).items()}
    actual = store.contents(dest)
    diffs = []
    for item in sorted(set(expected_texts) ^ set(actual)):
        side = "missing from" if item in expected_texts else "extra in"
        diffs.append(f"{item}: {side} {dest!r}")
    common = sorted(set(expected_texts) & set(actual))
    embedder = get_embedder(store.model(dest).embedder)
    vectors = embedder.embed([expected_texts[i] for i in common]) if common else []
    for item, vector in zip(common, vectors, strict=True):
        text, stored = actual[item]
        if text != expected_texts[item]:
            diffs.append(f"{item}: text {text!r} != {expected_texts[item]!r}")
        elif len(stored) != len(vector) or any(
            not math.isclose(a, b, abs_tol=tolerance)
            for a, b in zip(stored, vector, strict=True)
        ):
            diffs.append(f"{item}: stored vector differs from a fresh embedding")
    return diffs


def terminal(statuses: Iterable[str]) -> bool:
    return all(status in TERMINAL for status in statuses)
