"""The demo: keybatch against one database transaction per operation.

`python -m examples.demo` (from the repository root) needs no argument and no
server. Many concurrent clients deposit to and withdraw from a few hot accounts
stored in SQLite (a temporary file, WAL mode, `synchronous=NORMAL`, every
transaction committed), for a fixed time, twice: once through a keybatch
processor (load the balance row, apply every deposit and withdrawal of the batch,
write back once with an optimistic version check), once the usual way (one
transaction per operation).
It prints operations per second, database transactions, p50/p99 latency, the
speed-up, and a consistency check of the final balances against the operations
that succeeded. `--db postgresql://...` runs it on PostgreSQL instead
(`pip install 'psycopg[binary]'`, or `-r examples/demo/requirements.txt`).

The database is only reached from worker threads (`anyio.to_thread`), through a
small pool of connections (one for SQLite, which has a single writer anyway), so
the event loop never blocks. Built on keybatch's public API only.
"""

from ._cli import main, parse_args
from ._db import Account, DemoError, Overdraft
from ._progress import Progress
from ._workload import DemoResult, RunResult, check, run_demo

__all__ = [
    "Account",
    "DemoError",
    "DemoResult",
    "Overdraft",
    "Progress",
    "RunResult",
    "check",
    "main",
    "parse_args",
    "run_demo",
]
