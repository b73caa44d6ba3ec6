#!/usr/bin/env bash
# Fresh machine -> autosdpa tuning real attention calls into the default SQLite cache, then what it chose.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${AUTOSDPA_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e .
export OPENBLAS_NUM_THREADS=1
python scripts/demo.py "$@"
autosdpa doctor
