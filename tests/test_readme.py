"""The README's first screen stays true: its commands are the ones CI runs."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _first_screen_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()[:40]
    return [line.strip() for line in lines if line.startswith("    python3 -m venv")]


def test_first_screen_has_a_demo_and_a_test_command() -> None:
    demo, test = _first_screen_commands()
    assert demo.endswith("-m examples.demo")
    assert test.endswith("-m pytest")


def test_ci_runs_exactly_the_readme_test_command() -> None:
    _, test = _first_screen_commands()
    ci_lines = [
        line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
    ]
    assert test in ci_lines
    assert ci_lines[-1] == test, "the test command is the last thing CI runs"
