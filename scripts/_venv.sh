# Sourced by quickstart.sh and test.sh: enter (or make) the venv with CPU torch pinned, then autosdpa.
# Usage: . scripts/_venv.sh [EXTRAS]   e.g. ". scripts/_venv.sh dev"
VENV=${AUTOSDPA_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
if [ "${1:-}" = dev ] && [ "${AUTOSDPA_UNPINNED:-0}" != 1 ]; then
  # Test dependencies at the versions the suite last passed with (tests/constraints.txt), so a release
  # tomorrow cannot turn CI red; pins of torch and what it needs are dropped (the venv's torch stays).
  # AUTOSDPA_UNPINNED=1 installs today's newest instead, to try them before moving the pins.
  python scripts/constraints.py usable tests/constraints.txt >"$VENV/constraints.txt"
  pip install -q -c "$VENV/constraints.txt" -e ".[dev]"
else
  pip install -q -e ".${1:+[$1]}"
fi
export OPENBLAS_NUM_THREADS=1
# The device image's Triton (3.6) beside the venv's, for the sm_90a compile check in
# tests/test_compile_kernels.py. Test set-up only ("dev"), so the quickstart stays fast.
if [ "${1:-}" = dev ] && [ ! -d .triton36/triton ]; then
  pip install -q --no-deps --target .triton36 triton==3.6.0 \
    || echo "note: could not install triton 3.6.0 into .triton36; the compile check skips Triton 3.6"
fi
