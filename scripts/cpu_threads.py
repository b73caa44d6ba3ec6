"""Does the CPU thread count change which backend wins? (Decides whether it belongs in the CPU fingerprint.)

For a few CPU problems, times PyTorch's math and flash backends side by side (interleaved rounds, medians)
with ``torch.set_num_threads(n)`` for each n, and reports the winner per thread count. Writes JSON + markdown.

    python scripts/cpu_threads.py [--threads 1,2] [--rounds 30] [--out benchmarks/]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [  # (label, B, H, Lq, Lk, D, causal, train)
    ("decode L=1/2048 D=64", 1, 8, 1, 2048, 64, False, False),
    ("prefill 128 D=64", 1, 8, 128, 128, 64, False, False),
    ("causal 256 D=64", 1, 8, 256, 256, 64, True, False),
    ("prefill 512 D=64", 2, 8, 512, 512, 64, False, False),
    ("causal 512 D=128", 1, 8, 512, 512, 128, True, False),
    ("train causal 256 D=64", 1, 4, 256, 256, 64, True, True),
    ("small 32 D=16", 4, 2, 32, 32, 16, False, False),
]
BACKENDS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}


def one_run(backend, q, k, v, causal, train, calls):
    t0 = time.perf_counter()
    with sdpa_kernel([backend]):
        for _ in range(calls):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            if train:
                out.sum().backward()
    return (time.perf_counter() - t0) / calls


def time_shape(shape, rounds: int) -> dict[str, float]:
    _label, b, h, lq, lk, d, causal, train = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g).requires_grad_(train) for n in (lq, lk, lk))
    first = one_run(BACKENDS["math"], q, k, v, causal, train, 1)
    calls = max(1, min(200, int(0.02 / max(first, 1e-6))))
    for be in BACKENDS.values():  # warm-up
        one_run(be, q, k, v, causal, train, calls)
    samples: dict[str, list[float]] = {n: [] for n in BACKENDS}
    for _ in range(rounds):  # interleaved: both backends see the same machine noise
        for name, be in BACKENDS.items():
            samples[name].append(one_run(be, q, k, v, causal, train, calls))
    return {n: statistics.median(s) for n, s in samples.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", default="benchmarks")
    a = ap.parse_args()
    threads = [int(x) for x in a.threads.split(",")]
    results = []
    for shape in SHAPES:
        row = {"problem": shape[0], "by_threads": {}}
        for n in threads:
            torch.set_num_threads(n)
            t = time_shape(shape, a.rounds)
            row["by_threads"][str(n)] = {"median_s": t, "winner": min(t, key=t.get),
                                         "ratio": max(t.values()) / min(t.values())}
        row["winner_changes"] = len({r["winner"] for r in row["by_threads"].values()}) > 1
        results.append(row)
        print(json.dumps(row), flush=True)
    doc = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "machine": {"cpu": platform.processor() or platform.machine(), "platform": platform.platform(),
                       "cpu_capability": torch.backends.cpu.get_cpu_capability()},
           "rounds": a.rounds, "threads": threads, "results": results}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_threads.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# Does the CPU thread count change the winner? ({doc['date']}, torch {doc['torch']})", "",
             "| problem | " + " | ".join(f"{n} thread(s): math / flash (winner)" for n in threads)
             + " | winner changes |", "|---" * (len(threads) + 2) + "|"]
    for r in results:
        cells = [f"{v['median_s']['math'] * 1e6:.0f} / {v['median_s']['flash'] * 1e6:.0f} µs ({v['winner']})"
                 for v in r["by_threads"].values()]
        lines.append(f"| {r['problem']} | " + " | ".join(cells) + f" | {'**yes**' if r['winner_changes'] else 'no'} |")
    (out / "cpu_threads.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
