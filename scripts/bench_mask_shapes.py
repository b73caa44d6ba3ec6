#!/usr/bin/env python3
"""Every mask shape PyTorch broadcasts, after warm-up: autosdpa's cost against F.sdpa's (issue 17, item 2).

Per-head masks and biases ((1, H, Lq, Lk) position biases, (B, H, Lq, Lk) and (B, H, 1, Lk) padding, 3-D
(H, Lq, Lk)) used to be tuned again on every call. For each shape (bool and float, random values: no structure)
autosdpa is called once (it decides), then F.sdpa and autosdpa are timed in interleaved rounds (new random order
each round; medians), fp32, 1 thread. Target: autosdpa <= 1.1x F.sdpa after warm-up, one decision per shape.

    python scripts/bench_mask_shapes.py [--rounds 15] [--out benchmarks]

Writes OUT/mask_shapes_cpu.{json,md} with the machine, versions, date and load average.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

B, H, L, D = 2, 8, 256, 64
TARGET = 1.1


def shapes():
    out = [(L, L), (1, L), (L, 1)]
    out += [(h, lq, L) for h in (1, H) for lq in (1, L)]
    out += [(b, h, lq, L) for b, h, lq in itertools.product((1, B), (1, H), (1, L))]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    os.environ["AUTOSDPA_DB"] = os.path.join(tempfile.mkdtemp(prefix="bench-shapes-"), "s.sqlite")
    import autosdpa
    from autosdpa.dispatch import Dispatcher
    from autosdpa.sweep import machine_info

    autosdpa.reset()
    decisions = []
    real = Dispatcher.decide
    Dispatcher.decide = lambda self, call, policy, **kw: (decisions.append(1), real(self, call, policy, **kw))[1]
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(torch.device("cpu")), "rounds": a.rounds, "loadavg_start": os.getloadavg(),
            "qkv": [B, H, L, D]}
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    rows = []
    for shape, dtype in itertools.product(shapes(), (torch.bool, torch.float32)):
        m = (torch.rand(shape, generator=g) > 0.3) if dtype is torch.bool else torch.randn(shape, generator=g)
        if dtype is torch.bool:
            m[..., 0] = True
        before = len(decisions)
        autosdpa.sdpa(q, k, v, attn_mask=m)  # first sight
        fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
               "autosdpa": lambda: autosdpa.sdpa(q, k, v, attn_mask=m)}
        times = {n: [] for n in fns}
        order = list(fns)
        for _ in range(a.rounds):
            random.shuffle(order)
            for n in order:
                t0 = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - t0)
        med = {n: statistics.median(t) for n, t in times.items()}
        ratio = med["autosdpa"] / med["sdpa"]
        n_dec = len(decisions) - before
        rows.append({"mask": list(shape), "dtype": str(dtype).replace("torch.", ""), "sdpa_s": med["sdpa"],
                     "autosdpa_s": med["autosdpa"], "cost": ratio, "decisions": n_dec,
                     "met": ratio <= TARGET and n_dec <= 1})
        print(f"{shape} {dtype}: {ratio:.3f}x, {n_dec} decision(s)", flush=True)
    meta["loadavg_end"] = os.getloadavg()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mask_shapes_cpu.json").write_text(json.dumps({"meta": meta, "cases": rows}, indent=1) + "\n")
    v = meta["machine"]["versions"]
    costs = [r["cost"] for r in rows]
    lines = ["# Every mask shape: autosdpa's cost after warm-up against F.sdpa (CPU)", "",
             f"Made by `scripts/bench_mask_shapes.py` on {meta['date']}: {meta['machine']['device_name']}, "
             f"{meta['machine']['cpu_count']} CPUs, torch {v['torch']}, Python {v['python']}; 1 thread; q, k, v "
             f"{B}x{H}x{L}x{D} fp32; load average {meta['loadavg_start'][0]:.2f} at the start, "
             f"{meta['loadavg_end'][0]:.2f} at the end; {a.rounds} interleaved rounds, medians. Masks of random "
             "values (no structure). Target: cost <= 1.1x F.sdpa, one decision per shape.", "",
             f"Cost over all {len(rows)} cases: median {statistics.median(costs):.3f}x, max {max(costs):.3f}x; "
             f"met in {sum(r['met'] for r in rows)} of {len(rows)}.", "",
             "| mask shape | dtype | F.sdpa | autosdpa | cost | decisions | met |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'x'.join(map(str, r['mask']))} | {r['dtype']} | {r['sdpa_s'] * 1e3:.2f} ms | "
                     f"{r['autosdpa_s'] * 1e3:.2f} ms | {r['cost']:.3f}x | {r['decisions']} | "
                     f"{'yes' if r['met'] else 'NO'} |")
    (out / "mask_shapes_cpu.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
