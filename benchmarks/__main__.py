"""Run every benchmark: ``python -m benchmarks [--tiny | --full] [--only NAME ...]``.

Each ``benchmarks/bench_<name>.py`` runs in a subprocess of its own (a fresh
interpreter: no memory or event-loop state carried from one to the next), one
after the other, in name order, with the same mode. Quick mode is the default;
``--full`` is the long run, and ends with the soak test (``pytest -m soak``).
``--json DIR`` keeps each benchmark's results as
``DIR/<name>.json``; ``--plot DIR`` has the benchmarks that draw write PNGs there.
Exits non-zero if any benchmark failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover() -> list[str]:
    """Names of the benchmark modules (``bench_<name>.py`` -> ``<name>``)."""
    return sorted(p.stem[len("bench_") :] for p in HERE.glob("bench_*.py"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="smoke-sized runs")
    size.add_argument("--full", action="store_true", help="the long runs")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these only")
    parser.add_argument("--json", metavar="DIR", help="write DIR/<name>.json")
    parser.add_argument("--plot", metavar="DIR", help="write PNG plots into DIR")
    args = parser.parse_args(argv)
    names = discover()
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"no such benchmark: {', '.join(unknown)} (have {names})")
        names = [n for n in names if n in args.only]
    failed = []
    for name in names:
        cmd = [sys.executable, "-m", f"benchmarks.bench_{name}"]
        if args.tiny:
            cmd.append("--tiny")
        elif args.full:
            cmd.append("--full")
        if args.json:
            os.makedirs(args.json, exist_ok=True)
            cmd += ["--json", os.path.join(args.json, f"{name}.json")]
        if args.plot:
            os.makedirs(args.plot, exist_ok=True)
            cmd += ["--plot", args.plot]
        print(f"$ python -m benchmarks.bench_{name} {' '.join(cmd[3:])}".rstrip())
        sys.stdout.flush()
        began = time.perf_counter()
        code = subprocess.call(cmd, cwd=HERE.parent)
        print(f"({name}: {time.perf_counter() - began:.1f} s, exit {code})\n")
        sys.stdout.flush()
        if code:
            failed.append(name)
    if args.full and not args.only:
        # The soak test (a million operations with 1% faults) is long: it runs
        # with the full benchmarks, not in the default test suite.
        cmd = [sys.executable, "-m", "pytest", "-m", "soak", "-q", "tests/test_soak.py"]
        print("$ " + " ".join(["python", *cmd[1:]]))
        sys.stdout.flush()
        if subprocess.call(cmd, cwd=HERE.parent):
            failed.append("soak")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
