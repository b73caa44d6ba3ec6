"""The sweep: PyTorch's default vs every eligible backend alone vs autosdpa after tuning, per problem, side by side.

Problems: LLM prefill and decode (GQA, causal, KV cache Lq != Lk), encoders (ViT; BERT with padding masks),
diffusion (long L, D=64, cross-attention), training (forward + backward); fp32/bf16 on CPU, fp16/bf16/fp32 on
CUDA. Writes STEM.json (machine, versions, date, load average, every timing with spread), STEM.md and STEM.png
(needs matplotlib), and prints whether the issue's targets are met. The same sweep as ``autosdpa bench --sweep``.

    python scripts/bench_sweep.py                      # CPU, full table -> benchmarks/sweep_cpu.*
    python scripts/bench_sweep.py --device cuda --quick # the device check (~1.5 min on an H100)
    python scripts/bench_sweep.py --quick --dry --out /tmp/x   # tiny sizes: checks that it runs
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--quick", action="store_true", help="a subset of the problems, shorter timing")
    ap.add_argument("--dry", action="store_true", help="tiny sizes and few rounds: checks that the sweep runs")
    ap.add_argument("--seconds", type=float, default=None, help="interleaved timing per problem")
    ap.add_argument("--budget", type=float, default=None, help="tuning budget per problem (default: AUTOSDPA_BUDGET)")
    ap.add_argument("--db", default=None, help="keep the tuned database here (a new file; default: a temp file)")
    ap.add_argument("--out", default="benchmarks", help="output directory")
    ap.add_argument("--stem", default=None, help="file name stem (default: sweep_<device type>)")
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import torch

    from autosdpa import sweep, sweep_report

    from pathlib import Path

    try:  # a bad --out must fail before minutes of timing, not after
        Path(a.out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"cannot write to {a.out}: {e}", file=sys.stderr)
        return 2
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine", file=sys.stderr)
        return 2

    def progress(i, n, name):
        print(f"[{i}/{n}] {name}  (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)

    doc = sweep.run_sweep(dev, quick=a.quick, dry=a.dry, seconds=a.seconds, budget_s=a.budget, db=a.db,
                          progress=progress)
    paths, note = sweep_report.write_outputs(doc, a.out, a.stem or f"sweep_{dev.type}", plot=not a.no_plot)
    print(sweep_report.markdown(doc))
    print("wrote " + ", ".join(map(str, paths)), file=sys.stderr)
    if note:
        print(note, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
