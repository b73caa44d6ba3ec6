#!/usr/bin/env bash
# Set up a virtual environment (CPU torch from the pinned wheel, then autosdpa with its dev extras) and run
# the test suite. Extra arguments go to pytest, e.g. `bash scripts/test.sh -m gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${AUTOSDPA_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e '.[dev]'
export OPENBLAS_NUM_THREADS=1
python -m pytest -q "$@"
