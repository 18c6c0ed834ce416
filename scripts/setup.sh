#!/usr/bin/env bash
# Create .venv (Python 3.11) and install gatedprune with the given extra, torch pinned by
# constraints.txt to the 2.13.0 CPU build. Idempotent: reruns are quick.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-demo}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
  -c constraints.txt -e ".[${extra}]"
.venv/bin/python -c "import gatedprune, torch; print('gatedprune', gatedprune.__version__, '| torch', torch.__version__)"
