#!/usr/bin/env bash
# Build .gpu_wheels/ (gitignored): the packages autosdpa needs that the device image lacks, as wheels for the
# image's CPython 3.12 on manylinux x86-64. The image already holds torch, triton, numpy, click, rich,
# typing_extensions, pytest and hypothesis (the device tool's KINDS.md, "Python packages already there");
# it lacks SQLAlchemy and platformdirs, and nothing can be downloaded there.
#
#   here:    bash scripts/gpu_wheels.sh
#   device:  run(command="bash scripts/gpu_check.sh", carry=[".gpu_wheels"], timeout_s=330)
#
# Versions default to the ones this machine's Python has (what the CPU tests ran with); override with
# GPU_WHEELS="SQLAlchemy==X platformdirs==Y".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.gpu_wheels

version_of() {  # installed version of a distribution, or the fallback
  "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except Exception: print(sys.argv[2])" "$1" "$2" 2>/dev/null || echo "$2"
}

WANT=${GPU_WHEELS:-"SQLAlchemy==$(version_of sqlalchemy 2.1.9) platformdirs==$(version_of platformdirs 4.14.8)"}
IMAGE=" typing-extensions click rich numpy torch triton pytest hypothesis packaging "   # already on the device

fetch() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$1"
}

have() { ls "$DEST" | tr 'A-Z_' 'a-z-' | grep -q "^$1-"; }

rm -rf "$DEST"
mkdir -p "$DEST"
for spec in $WANT; do fetch "$spec"; done
# Their own needs (not extras): in the image already, or fetched too (e.g. greenlet for SQLAlchemy 2.0).
for whl in "$DEST"/*.whl; do
  unzip -p "$whl" '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: //p' | { grep -v 'extra ==' || true; } \
    | sed -E 's/[ ;<>=!~([].*//' | tr 'A-Z_' 'a-z-' | while read -r name; do
      [ -z "$name" ] && continue
      case "$IMAGE" in *" $name "*) continue ;; esac
      have "$name" || { echo "also fetching $name (needed by $(basename "$whl"))"; fetch "$name"; }
    done
done
ls -1 "$DEST"
du -sh "$DEST"
