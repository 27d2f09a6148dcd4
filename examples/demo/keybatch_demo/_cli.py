"""The command line: `python -m examples.demo [flags]`."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from functools import partial

import anyio

from ._db import DemoError
from ._workload import DEFAULT_MIN_DURATION, run_demo


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the demo's command line (`sys.argv[1:]` by default)."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.demo",
        description=(
            "Many clients deposit to and withdraw from a few hot accounts, through"
            " keybatch and then with one database transaction per operation;"
            " prints throughput, transactions, latency and a consistency check."
        ),
    )
    add = parser.add_argument
    add(
        "--clients",
        type=_positive_int,
        default=1000,
        metavar="N",
        help="concurrent clients (default: 1000)",
    )
    add(
        "--keys",
        type=_positive_int,
        default=20,
        metavar="N",
        help="hot accounts (default: 20)",
    )
    add(
        "--seconds",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="length of each of the two runs (default: 10)",
    )
    add(
        "--min-duration",
        type=_seconds,
        default=DEFAULT_MIN_DURATION,
        metavar="S",
        help="keybatch's batch window; 0 batches what piled up (default: 0)",
    )
    add(
        "--backend",
        choices=("trio", "asyncio"),
        default="trio",
        help="event loop (default: trio)",
    )
    add(
        "--db",
        default=None,
        metavar="PATH|URL",
        help="a SQLite file, or a postgresql:// URL (needs psycopg);"
        " its tables demo_accounts and demo_ledger are recreated"
        " (default: a SQLite file in a new temporary directory)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo from the command line; return the exit status.

    0 when both runs are consistent, 1 when a consistency check failed, 2 when
    the demo could not run, 130 when interrupted (Ctrl-C).
    """
    args = parse_args(argv)
    demo = partial(
        run_demo,
        args.clients,
        args.keys,
        args.seconds,
        min_duration=args.min_duration,
        db=args.db,
    )
    try:
        result = anyio.run(demo, backend=args.backend)
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        return 130
    print()
    print(result.table())
    return 0 if result.consistent else 1
