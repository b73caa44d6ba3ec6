#!/usr/bin/env bash
# Fresh machine -> autosdpa tuning real attention calls into the default SQLite cache, then what it chose.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
python scripts/demo.py "$@"
autosdpa doctor
# The venv was active only inside this script: say how to reach the `autosdpa` command from the user's shell.
echo
echo "autosdpa is installed in $(pwd)/$VENV. To use the command line from your shell:"
echo "    source $VENV/bin/activate        # then: autosdpa show, autosdpa tune --help, ..."
echo "or call it directly: $VENV/bin/autosdpa show"
