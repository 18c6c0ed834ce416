#!/usr/bin/env bash
# Set up (extra "dev") and run the whole test suite: lint, format check, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
.venv/bin/mypy
# the tests run single-threaded (tests/conftest.py), so one pytest-xdist worker per core;
# GATEDPRUNE_TEST_WORKERS=0 runs them in this process (e.g. to debug with -x / --pdb)
.venv/bin/python -m pytest -n "${GATEDPRUNE_TEST_WORKERS:-auto}" "$@"
