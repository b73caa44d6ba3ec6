#!/usr/bin/env bash
# The one prepared device check: ends within 300 s, so a corrective rerun fits in a 15-minute device session.
#
#   here:    bash scripts/gpu_wheels.sh            # SQLAlchemy + platformdirs wheels for the image's Python 3.12
#   device:  run(command="bash scripts/gpu_check.sh", carry=[".gpu_wheels"], timeout_s=330)
#   CPU rehearsal (tests/test_gpu_check.py): GPU_CHECK_DEVICE=cpu OUT=/tmp/gc bash scripts/gpu_check.sh
#
# Steps, most valuable first, each under its own time limit and stopped with SIGINT (pytest and `autosdpa
# tune` then write their summaries); results are written as each step ends and results.tar.gz is refreshed:
#   facts (versions, GPU) -> pytest -m gpu (one kernel config, JUnit XML) -> kernel benchmark on the issue's
#   target problems -> sweep (scripts/bench_sweep.py, if present) -> tune + bench Llama-3-8B shapes -> warm
#   start (scripts/bench_warm_start.py) -> export the tuned DB to tuning_db/<gpu>.sqlite -> host time per
#   call of a plan's winner, checked path vs runner (scripts/bench_runners.py; last: it takes the time left).
# $OUT gets at most 7 files: summary.txt (read first), results.tar.gz (unpack at the repo root: benchmarks/,
# tuning_db/, logs/), junit_gpu.xml, facts.json, kernels_targets.md, llama3_bench.md, <gpu>.sqlite.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-/tmp/autosdpa-gpu-out}
DEV=${GPU_CHECK_DEVICE:-cuda}
SCALE=${GPU_CHECK_SCALE:-1}          # multiplies each step's time limit
DEADLINE=${GPU_CHECK_DEADLINE:-290}  # seconds from the start by which every step has ended
WORK=$(mktemp -d)
mkdir -p "$OUT" "$WORK/benchmarks" "$WORK/tuning_db" "$WORK/logs"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
archive() { tar -C "$WORK" -czf "$OUT/results.tar.gz" benchmarks tuning_db logs 2>/dev/null; }

# A step's command, with SIGINT restored to its default first: a shell started in the background ignores
# SIGINT, its children inherit that, and Python would then never see the KeyboardInterrupt that makes pytest
# and the CLI write their summaries.
SIGDFL='import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])'
step() {  # step NAME SECONDS CMD...: run under min(SECONDS*SCALE, time left), log, record, archive
  local name=$1 want=$2; shift 2
  local left=$((DEADLINE - SECONDS - 12))
  local limit
  limit=$(python3 -c "print(max(1, int(min($want * $SCALE, $left))))")
  if [ "$left" -lt 3 ]; then note "[$name] skipped: no time left"; return; fi
  local t0=$SECONDS
  timeout -s INT -k 8 "$limit" python3 -c "$SIGDFL" "$@" >"$WORK/logs/$name.log" 2>&1
  local rc=$?
  local how="rc=$rc"
  [ "$rc" = 124 ] || [ "$rc" = 130 ] && how="rc=$rc (stopped at its ${limit}s limit)"
  [ "$rc" = 137 ] && how="rc=137 (killed after its ${limit}s limit)"
  note "[$name] $how in $((SECONDS - t0))s"
  tail -n 12 "$WORK/logs/$name.log" | cut -c1-240 | sed 's/^/    /' >>"$SUMMARY"
  archive
}

# --- packages: the image lacks SQLAlchemy and platformdirs; nothing can be downloaded there -------------
SITE=$WORK/site     # the wheels, installed fresh each run
SHIM=$REPO/kernels  # holds the autosdpa_kernels package: importable with no (editable) install
mkdir -p "$SITE"
# (the CPU rehearsal's Python is not the image's 3.12: it uses its own packages unless GPU_CHECK_WHEELS=1)
if ls .gpu_wheels/*.whl >/dev/null 2>&1 && { [ "$DEV" != cpu ] || [ "${GPU_CHECK_WHEELS:-0}" = 1 ]; }; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .gpu_wheels/*.whl \
    >"$WORK/logs/install.log" 2>&1 || note "wheel install failed: $(tail -n 1 "$WORK/logs/install.log")"
fi
export PYTHONPATH="$SITE:$REPO:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
# The C hot path (setup.py) for this Python, built in place when missing (a few seconds); without it the
# Python one runs and the overhead figures are that path's.
if ! python3 -c "import autosdpa._fastkey" >/dev/null 2>&1; then
  python3 setup.py -q build_ext --inplace >"$WORK/logs/native.log" 2>&1 \
    || note "C fast key not built: $(tail -n 1 "$WORK/logs/native.log")"
fi
export OPENBLAS_NUM_THREADS=1 PYTHONUNBUFFERED=1 AUTOSDPA_KERNEL_CONFIGS=${AUTOSDPA_KERNEL_CONFIGS:-one}
export AUTOSDPA_DB="$WORK/user.sqlite"   # the working DB; tuning_db/ gets only the export
export TRITON_CACHE_DIR="$WORK/triton_cache"   # empty: its entries at the end = kernels compiled by this run
if ! err=$(python3 -c "import autosdpa, sqlalchemy, platformdirs, triton, autosdpa_kernels" 2>&1); then
  note "STOP: cannot import autosdpa's requirements ($(echo "$err" | tail -n 1)); run scripts/gpu_wheels.sh here and carry .gpu_wheels"
  archive
  exit 3
fi
note "date: $(date -u +%FT%TZ)  device: $DEV  kernel configs: $AUTOSDPA_KERNEL_CONFIGS  hot path: $(python3 -c \
  'from autosdpa import fastkey; print(fastkey.describe())' 2>&1 | tail -n 1)"

# --- (a) versions and device facts; the GPU's tag (h100, h200, ...) names the shipped DB ------------------
FACTS='
import json, os, platform, re, subprocess, sys
import torch, triton
dev = sys.argv[1]
name = os.environ.get("GPU_CHECK_GPU_NAME")  # tests: the tag rule on a named GPU
f = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
         cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None)
if dev != "cpu" and torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    f.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
             l2_bytes=getattr(p, "L2_cache_size", None), memory_bytes=p.total_memory,
             smem_per_block_optin=getattr(p, "shared_memory_per_block_optin", None))
    try:
        f["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                          "--format=csv,noheader"], capture_output=True, text=True,
                                         timeout=10).stdout.strip()
    except Exception as e:
        f["nvidia_smi"] = repr(e)
    name = name or p.name
if name:  # the model ("NVIDIA H100 80GB HBM3" -> h100), not the last word of the name
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    f.update(gpu=name, tag=m.group(1).lower() if m else "gpu-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
else:
    f.update(gpu=None, tag="cpu")
open(sys.argv[2], "w").write(json.dumps(f, indent=1) + "\n")
'
printf '%s' "$FACTS" >"$WORK/facts.py"
step facts 20 python3 "$WORK/facts.py" "$DEV" "$WORK/benchmarks/device_facts.json"
cat "$WORK/benchmarks/device_facts.json" >>"$SUMMARY" 2>/dev/null
cp "$WORK/benchmarks/device_facts.json" "$OUT/facts.json" 2>/dev/null
GPU=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["tag"])' "$WORK/benchmarks/device_facts.json" \
      2>/dev/null || echo "$DEV")
note "gpu tag: $GPU"

# --- (b) GPU tests, one kernel config each ------------------------------------------------------------------
# shellcheck disable=SC2086  # GPU_CHECK_TESTS: test paths (the CPU rehearsal runs a few)
step pytest_gpu 95 python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --no-header \
  --junitxml="$WORK/logs/junit_gpu.xml" ${GPU_CHECK_TESTS:-tests}
cp "$WORK/logs/junit_gpu.xml" "$OUT/junit_gpu.xml" 2>/dev/null

# --- (c) the kernel benchmark on the issue's target problems ------------------------------------------------
step kernel_targets 60 python3 scripts/bench_kernels.py --targets --out "$WORK/benchmarks"
cp "$(ls -t "$WORK"/benchmarks/kernels-*.md 2>/dev/null | head -n 1)" "$OUT/kernels_targets.md" 2>/dev/null

# --- (d) the sweep, when another helper has shipped it ------------------------------------------------------
if [ -f scripts/bench_sweep.py ]; then
  step sweep 25 python3 scripts/bench_sweep.py --device "$DEV" --quick --out "$WORK/benchmarks/sweep_$GPU"
else
  note "[sweep] skipped: scripts/bench_sweep.py is not in this checkout"
fi

# --- (e) tune and bench a few Llama-3-8B shapes (the tiny preset on the CPU) --------------------------------
if [ "$DEV" = cpu ]; then
  SHAPES=(--preset tiny)
else
  SHAPES=(--shape b=1,hq=32,hkv=8,lq=2048,d=128,bf16,causal --shape b=1,hq=32,hkv=8,lq=8192,d=128,bf16,causal
          --shape b=8,hq=32,hkv=8,lq=1,lk=8192,d=128,bf16 --shape b=1,hq=32,hkv=8,lq=1,lk=32768,d=128,bf16)
fi
step tune 45 sh -c "python3 -m autosdpa.cli tune --device $DEV --budget 0.3 --json ${SHAPES[*]} \
  > '$WORK/benchmarks/tune_llama3_$GPU.json'"
step bench 30 python3 -m autosdpa.cli bench --device "$DEV" --budget 0.3 --seconds 0.2 --no-plot "${SHAPES[@]}" \
  --out "$WORK/benchmarks/bench_llama3_$GPU"
cp "$WORK/benchmarks/bench_llama3_$GPU/bench.md" "$OUT/llama3_bench.md" 2>/dev/null

# --- (f) warm start: tuning time with and without the rows of "another torch version" ----------------------
step warm_start 25 python3 scripts/bench_warm_start.py --device "$DEV" --quick --repeat 1 --budget 0.3 \
  --out "$WORK/benchmarks"

# --- (g) the tuned DB to ship --------------------------------------------------------------------------------
step export_db 15 python3 -m autosdpa.cli db export --force -o "$WORK/tuning_db/$GPU.sqlite"
cp "$WORK/tuning_db/$GPU.sqlite" "$OUT/$GPU.sqlite" 2>/dev/null

# --- (h) a plan's winner per call: checked path vs the runner set up once per layout ------------------------
step runners 20 python3 scripts/bench_runners.py --device "$DEV" --rounds 10 --calls 100 --out "$WORK/benchmarks"

# --- (i) masks with structure (issue 18): mask objects on CUDA, no values read; kernel cases only (the device
# image has no transformers, so the Llama/BERT rows are owed) ----------------------------------------------
if [ "$DEV" != cpu ]; then
  step masks 20 python3 scripts/bench_masks.py --device "$DEV" --rounds 3 \
    --only causal,all_true,cpad_r,cpad_l,kpad_r,random --out "$WORK/benchmarks"
  cp "$WORK/benchmarks/masks_$DEV.md" "$OUT/masks_$DEV.md" 2>/dev/null
fi

archive
note "triton: $(ls "$TRITON_CACHE_DIR" 2>/dev/null | wc -l) cache entries made by this run (each one a compile)"
note "total: ${SECONDS}s; results: $(tar -tzf "$OUT/results.tar.gz" | grep -v '/$' | tr '\n' ' ')"
