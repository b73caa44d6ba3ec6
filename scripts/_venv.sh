# Sourced by quickstart.sh and test.sh: enter (or make) the venv with CPU torch pinned, then autosdpa.
# Usage: . scripts/_venv.sh [EXTRAS]   e.g. ". scripts/_venv.sh dev"
VENV=${AUTOSDPA_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e ".${1:+[$1]}"
export OPENBLAS_NUM_THREADS=1
