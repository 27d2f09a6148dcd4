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
    assert {
        "bench_overhead",
        "bench_database",
        "bench_scale",
        "bench_latency",
        "bench_storm",
    } <= set(BENCHMARKS)


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


def test_floor_counts_every_operation() -> None:
    """The floor (benchmarks/floor.py) runs on every loop and loses nothing."""
    from benchmarks import floor

    loops = ["trio", "asyncio"]
    if sys.platform != "win32":
        loops.append("uvloop")
    for loop in loops:
        for callers, keys in ((10, 2), (10, 10), (5, 1)):
            per_op = floor.floor_on(loop, callers, keys, ops=100)
            assert per_op > 0


def test_floor_check_against_the_reference(tmp_path: Path) -> None:
    """``python -m benchmarks.floor`` runs both floors side by side (tiny)."""
    reference = floor_reference(tmp_path)
    proc = _run(
        "benchmarks.floor",
        "--reference",
        str(reference),
        "--repeats",
        "1",
        "--ops",
        "2000",
        "--loops",
        "trio",
        "asyncio",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ours/reference" in proc.stdout


def floor_reference(tmp_path: Path) -> Path:
    """The reference floor if it is beside the repository, else a stand-in with
    the same interface (this floor under another name)."""
    from benchmarks import floor

    if floor.DEFAULT_REFERENCE.is_file():
        return floor.DEFAULT_REFERENCE
    stand_in = tmp_path / "floor.py"
    stand_in.write_text((ROOT / "benchmarks" / "floor.py").read_text())
    return stand_in
