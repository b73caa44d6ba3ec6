"""What following the tuned decision costs inside a compiled graph: torch.compile of an attention block calling
``autosdpa.sdpa`` (the custom op ``autosdpa::sdpa``) against the same block calling plain F.sdpa, timed side by
side, interleaved, medians. Writes JSON + a markdown table.

    python scripts/bench_compile.py [--out benchmarks/] [--backend inductor]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CASES = {  # (B, H, L, D), causal
    "tiny B=1 H=2 L=16 D=16": ((1, 2, 16, 16), True),
    "small B=2 H=8 L=128 D=64": ((2, 8, 128, 64), True),
    "medium B=4 H=8 L=512 D=64": ((4, 8, 512, 64), False),
}


def _block(attn):
    def f(q, k, v, causal):
        return attn(q * 1.0, k, v, is_causal=causal) + 1.0  # ops around it, as in a model
    return f


def _time(fn, args, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn(*args)
    return (time.perf_counter() - t0) / n


def run_case(shape, causal, backend, rounds):
    import autosdpa

    q, k, v = (torch.randn(*shape) for _ in range(3))
    fns = {"compiled F.sdpa": torch.compile(_block(F.scaled_dot_product_attention), backend=backend),
           "compiled autosdpa": torch.compile(_block(autosdpa.sdpa), backend=backend)}
    with torch.no_grad():
        for fn in fns.values():  # compile, and tune on first sight (outside the timing)
            fn(q, k, v, causal)
            fn(q, k, v, causal)
        one = min(_time(fn, (q, k, v, causal), 3) for fn in fns.values())
        n = max(1, min(2000, int(2e-3 / max(one, 1e-7))))
        samples = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                samples[name].append(_time(fn, (q, k, v, causal), n))
    med = {name: statistics.median(s) for name, s in samples.items()}
    diffs = [a - b for a, b in zip(samples["compiled autosdpa"], samples["compiled F.sdpa"])]
    return {"median_s": med, "ratio": med["compiled autosdpa"] / med["compiled F.sdpa"],
            "added_us_median": statistics.median(diffs) * 1e6, "calls_per_sample": n, "rounds": rounds,
            "decision": autosdpa.explain(q, k, v, is_causal=causal).backend}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("AUTOSDPA_DB", str(Path(tempfile.mkdtemp()) / "bench.sqlite"))
    load_before = os.getloadavg()
    results = {name: run_case(shape, causal, a.backend, a.rounds) for name, (shape, causal) in CASES.items()}
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": sys.version.split()[0],
            "compile_backend": a.backend, "load_before": load_before, "load_after": os.getloadavg()}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_cpu.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [f"# torch.compile: autosdpa's custom op vs plain F.sdpa (CPU, {a.backend})", "",
             f"{meta['date']}, {meta['machine']}, {meta['threads']} threads, torch {meta['torch']}; load average "
             f"{load_before[0]:.1f} before, {meta['load_after'][0]:.1f} after (shared machine). Forward, no grad; "
             f"medians of {a.rounds} interleaved samples.", "",
             "| case | autosdpa chose | compiled F.sdpa | compiled autosdpa | ratio | added per call (median of paired differences) |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        m = r["median_s"]
        lines.append(f"| {name} | {r['decision']} | {m['compiled F.sdpa'] * 1e6:.1f} µs | "
                     f"{m['compiled autosdpa'] * 1e6:.1f} µs | {r['ratio']:.2f}x | {r['added_us_median']:.1f} µs |")
        print(lines[-1], flush=True)
    (out / "compile_cpu.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
