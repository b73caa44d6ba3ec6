#!/usr/bin/env bash
# Set up a virtual environment (CPU torch from the pinned wheel, then autosdpa with its dev extras) and run
# the test suite. Extra arguments go to pytest, e.g. `bash scripts/test.sh -m gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh dev
python -m pytest -q "$@"
