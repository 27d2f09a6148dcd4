"""The complete programs in docs/*.md run against the current API.

A block counts as a program when it calls ``trio.run(`` or ``asyncio.run(`` at the
top level. trio programs run on the autojump MockClock (virtual time), except
those that use threads, whose waits the clock would jump over. Programs that
need a PostgreSQL server get `KEYBATCH_PG_DSN` from `DATABASE_URL` (default: the
local server at 127.0.0.1:5432, database `test`); they skip only outside CI when
no server answers there.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PROGRAM = re.compile(r"^(trio|asyncio)\.run\(", re.M)


def _programs() -> list[Any]:
    found = []
    for page in sorted(DOCS.glob("*.md")):
        blocks = BLOCK.findall(page.read_text(encoding="utf-8"))
        for number, code in enumerate(blocks):
            if PROGRAM.search(code):
                found.append(pytest.param(code, id=f"{page.stem}-{number}"))
    return found


@pytest.mark.parametrize("code", _programs())
def test_program_runs(
    code: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if "KEYBATCH_PG_DSN" in code:
        dsn = os.environ.get("KEYBATCH_PG_DSN") or os.environ.get(
            "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
        )
        if not _answers(dsn):
            if os.environ.get("CI"):
                pytest.fail(f"no PostgreSQL server answers at {dsn} (CI)")
            pytest.skip(f"needs a PostgreSQL server at {dsn}")
        monkeypatch.setenv("KEYBATCH_PG_DSN", dsn)
    if "to_thread" not in code:
        real_run = trio.run

        def virtual_run(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("clock", trio.testing.MockClock(autojump_threshold=0))
            return real_run(*args, **kwargs)

        monkeypatch.setattr(trio, "run", virtual_run)
    exec(compile(code, "<docs>", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out  # every program prints what it shows


def _answers(dsn: str) -> bool:
    import psycopg

    try:
        psycopg.connect(dsn, connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


def test_docs_have_programs() -> None:
    assert len(_programs()) >= 10
