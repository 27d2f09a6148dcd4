# Everyday tasks. `make help` lists them. Everything runs from .venv.
PY := .venv/bin/python
.PHONY: help venv test lint format types docs docs-serve bench bench-full demo ci

help:  ## list the tasks
	@grep -E '^[a-z-]+:.*##' Makefile | sed 's/:.*## /\t/'

venv:  ## create .venv with everything a developer needs
	python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev,bench]'

test:  ## the test suite (what CI runs)
	$(PY) -m pytest

lint:  ## ruff lint and format check
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format:  ## ruff format and autofix
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .

types:  ## mypy --strict on the library and the typing tests
	.venv/bin/mypy --strict keybatch && .venv/bin/mypy --strict tests/typing

docs:  ## build the docs site into site/ (warnings are errors)
	.venv/bin/mkdocs build --strict

docs-serve:  ## serve the docs with live reload
	.venv/bin/mkdocs serve

bench:  ## quick benchmarks, printed side by side
	$(PY) -m benchmarks

bench-full:  ## the long benchmarks (and the soak test)
	$(PY) -m benchmarks --full

demo:  ## the SQLite demo: keybatch against one transaction per operation
	$(PY) -m keybatch.demo

ci:  ## what CI runs, on a fresh venv
	bash .ci/run
