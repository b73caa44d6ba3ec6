#!/usr/bin/env bash
# The one prepared device check: GPU tests, GPU benchmarks, a tuned DB to ship. Everything lands in $OUT as
# summary.txt (read it first) and results.tar.gz (benchmarks/*, tuning_db/*, logs) to unpack at the repo root.
#
# The device image has torch/triton/click/rich but not sqlalchemy/platformdirs, and nothing can be fetched
# there, so carry wheels made here first:
#   pip download --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .gpu_wheels sqlalchemy platformdirs
#   device run: command="bash scripts/gpu_check.sh", carry=[".gpu_wheels"], timeout_s=540
# Rehearse it here first (same steps on the CPU, tiny preset): GPU_CHECK_DEVICE=cpu OUT=/tmp/gc bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/autosdpa-gpu-out}
WORK=$(mktemp -d)
mkdir -p "$OUT" "$WORK/benchmarks" "$WORK/tuning_db" "$WORK/logs"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
step() {  # step NAME SECONDS CMD...: run with a time limit, log to logs/NAME.log, record status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
  local rc=$?
  note "[$name] rc=$rc in $((SECONDS - t0))s"
  tail -n 15 "$WORK/logs/$name.log" | sed 's/^/    /' >>"$SUMMARY"
}

export OPENBLAS_NUM_THREADS=1 PYTHONUNBUFFERED=1
export AUTOSDPA_DB="$WORK/user.sqlite"  # the working DB; tuning_db/ gets only the export
[ -d .gpu_wheels ] && python3 -m pip install -q --no-index --find-links .gpu_wheels sqlalchemy platformdirs >/dev/null 2>&1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$WORK/logs/install.log" 2>&1 \
  || note "editable install failed (see logs/install.log)"
note "date: $(date -u +%FT%TZ)"
note "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
note "versions: $(python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "triton", triton.__version__)' 2>&1)"

DEV=${GPU_CHECK_DEVICE:-cuda}
PRESET=llama3-8b
[ "$DEV" = cpu ] && PRESET=tiny
gpu=$(python3 -c 'import torch; print(torch.cuda.get_device_name().split()[-1].lower())' 2>/dev/null || echo "$DEV")
# Time limits add up to ~500 s: run with timeout_s=540 and leave the rest of the 15 device minutes for a rerun.
step pytest_gpu 150 python3 -m pytest -m gpu -q --no-header -p no:cacheprovider -o addopts="" tests
step overhead 40 python3 scripts/bench_overhead.py --device "$DEV" --out "$WORK/benchmarks" --rounds 100
step bench_kernels 120 python3 scripts/bench_kernels.py --quick --out "$WORK/benchmarks"
step tune_preset 100 sh -c "python3 -m autosdpa.cli tune --device $DEV --preset $PRESET --budget 0.3 --json > '$WORK/benchmarks/tune_${PRESET}_$gpu.json'"
step bench_preset 60 python3 -m autosdpa.cli bench --device "$DEV" --preset "$PRESET" --seconds 0.3 --out "$WORK/benchmarks/bench_${PRESET}_$gpu"
step export_db 20 python3 -m autosdpa.cli db export -o "$WORK/tuning_db/$gpu.sqlite"
step doctor 20 python3 -m autosdpa.cli doctor --device "$DEV"

tar -C "$WORK" -czf "$OUT/results.tar.gz" benchmarks tuning_db logs
note "results: $(tar -tzf "$OUT/results.tar.gz" | tr '\n' ' ')"
