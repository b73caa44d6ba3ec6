#!/usr/bin/env bash
# Fresh machine -> autosdpa tuning real attention calls into the default SQLite cache, then what it chose.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
python scripts/demo.py "$@"
autosdpa doctor
