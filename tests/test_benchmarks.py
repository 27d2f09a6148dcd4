"""Smoke test of the benchmarks: each ``benchmarks/bench_*.py`` runs once, tiny.

Benchmarks never run in CI at full size; this keeps every script working. Each
runs in a subprocess, exactly as a user would run it, with ``--tiny``. Nothing
here asserts a speed: only that the script exits cleanly and prints its table.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))


def test_benchmarks_are_found() -> None:
    assert {"bench_overhead", "bench_database", "bench_scale", "bench_latency"} <= set(
        BENCHMARKS
    )


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("KEYBATCH_PG_DSN", None)  # the smoke test needs no server
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("module", BENCHMARKS)
def test_benchmark_runs_tiny(module: str) -> None:
    proc = _run(f"benchmarks.{module}", "--tiny")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(tiny mode)" in proc.stdout
    assert "---" in proc.stdout  # a table was printed
    assert "Traceback" not in proc.stderr


def test_runner_rejects_an_unknown_benchmark() -> None:
    proc = _run("benchmarks", "--tiny", "--only", "no_such_benchmark")
    assert proc.returncode != 0
    assert "no such benchmark" in proc.stderr


def test_runner_runs_the_selected_benchmark() -> None:
    proc = _run("benchmarks", "--tiny", "--only", "overhead")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "python -m benchmarks.bench_overhead --tiny" in proc.stdout
    assert "bench_scale" not in proc.stdout
