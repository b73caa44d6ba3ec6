"""First-sight cost of the tuner on CPU: how long ``autosdpa.tuner.measure()`` takes for a decode step
(B=1, H=8, Lq=1, Lk=64..2048, D=64, fp32) and a ViT-B/16-like call (B=64, H=12, L=197, D=64, fp32, budget
0.5 s), with math and flash as candidates, next to one plain ``F.sdpa`` call of the same problem.

All problems are measured in one process, repetitions interleaved across problems; each figure is the median
of the repetitions. ``--baseline REV`` also times the tuner of git revision REV (imported from a copy of its
``autosdpa/`` package) side by side. The machine's load average is recorded with the numbers: on a shared
machine they move with it. Writes OUT/first_sight_cpu.json and OUT/first_sight_cpu.md.

    python scripts/bench_first_sight.py [--reps 7] [--baseline 96388f9] [--threads 2,1] [--out benchmarks]

``--threads 2,1`` runs every contender under each torch thread count, one block per count: on a loaded machine
two threads add the thread pool's wake-up latency (milliseconds) to every parallel op.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
DECODE_LK = (64, 128, 256, 512, 1024, 2048)
DECODE_TARGET_S = 0.015
VIT_BUDGET_S = 0.5


def problems():
    g = torch.Generator().manual_seed(0)
    out = []
    for lk in DECODE_LK:
        q = torch.randn(1, 8, 1, 64, generator=g)
        k, v = torch.randn(1, 8, lk, 64, generator=g), torch.randn(1, 8, lk, 64, generator=g)
        out.append((f"decode Lk={lk}", (q, k, v), 1.0))
    x = torch.randn(64, 12, 197, 64, generator=g)
    out.append(("ViT-B/16 B=64 H=12 L=197", (x, x.clone(), x.clone()), VIT_BUDGET_S))
    return out


def load_baseline(rev: str):
    """The tuner module of git revision ``rev``, as package ``autosdpa_<rev>`` from a temporary copy."""
    name = f"autosdpa_{rev}"
    tmp = Path(tempfile.mkdtemp())
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "autosdpa"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=tar, check=True)
    (tmp / "autosdpa").rename(tmp / name)
    sys.path.insert(0, str(tmp))
    return importlib.import_module(f"{name}.tuner"), importlib.import_module(f"{name}.backends")


def plain_call_s(args, n=21) -> float:
    F.scaled_dot_product_attention(*args)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        F.scaled_dot_product_attention(*args)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def time_measure(tuner, backends_mod, args, budget) -> tuple[float, dict]:
    call = backends_mod.Call(*args)
    bs = [backends_mod.get("math"), backends_mod.get("flash")]
    t0 = time.perf_counter()
    rows = tuner.measure(call, bs, tuner.TuneConfig(budget_s=budget))
    elapsed = time.perf_counter() - t0
    meas = {m.backend: m for m in rows}
    winner, reason = tuner.choose(meas, list(meas), "flash")
    return elapsed, {"winner": winner, "reason": reason,
                     "rows": {m.backend: {"status": m.status, "samples": m.samples, "median_s": m.median_s,
                                          "detail": m.detail} for m in rows}}


def quartiles(xs):
    xs = sorted(xs)
    if len(xs) < 4:
        return xs[0], xs[-1]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7, help="repetitions of each measure() (median reported)")
    ap.add_argument("--baseline", default=None, help="git revision whose tuner is timed side by side")
    ap.add_argument("--baseline-reps", type=int, default=3)
    ap.add_argument("--threads", default=str(torch.get_num_threads()),
                    help="comma-separated torch thread counts, each timed (default: torch's own)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    from autosdpa import backends as backends_now
    from autosdpa import tuner as tuner_now

    tuners = {"now": (tuner_now, backends_now, a.reps)}
    if a.baseline:
        tuners[f"baseline {a.baseline}"] = (*load_baseline(a.baseline), a.baseline_reps)
    contenders = {f"{c}, {t} thr": (*v, t) for t in threads for c, v in tuners.items()}
    probs = problems()
    load_before = os.getloadavg()
    plain = {}
    for t in threads:
        torch.set_num_threads(t)
        plain[t] = {name: plain_call_s(args) for name, args, _ in probs}
    times = {c: {name: [] for name, _, _ in probs} for c in contenders}
    last = {c: {} for c in contenders}
    for t in threads:  # one block per thread count: switching it re-creates the thread pool
        torch.set_num_threads(t)
        block = {c: v for c, v in contenders.items() if v[3] == t}
        for name, args, budget in probs:  # warm-up: first calls of each op at this thread count
            time_measure(tuner_now, backends_now, args, min(budget, 0.05))
        for rep in range(max(v[2] for v in block.values())):
            for name, args, budget in probs:  # interleaved: load drift hits every problem and contender alike
                for c, (tuner, bmod, reps, _) in block.items():
                    if rep < reps:
                        s, info = time_measure(tuner, bmod, args, budget)
                        times[c][name].append(s)
                        last[c][name] = info
                        print(f"{c:>28} {name:<26} {s * 1e3:9.1f} ms  winner {info['winner']}", flush=True)
    load_after = os.getloadavg()
    results = []
    for name, args, budget in probs:
        for c, (*_, t) in contenders.items():
            ts = times[c][name]
            lo, hi = quartiles(ts)
            med, one = statistics.median(ts), plain[t][name]
            row = {"problem": name, "contender": c, "torch_threads": t, "budget_s": budget,
                   "shape": {"q": list(args[0].shape), "k": list(args[1].shape)}, "plain_call_s": one,
                   "measure_s_median": med, "measure_s_p25": lo, "measure_s_p75": hi, "runs": ts,
                   "last": last[c][name]}
            if name.startswith("decode"):
                row["target"] = f"measure() <= {DECODE_TARGET_S * 1e3:.0f} ms"
                row["met"] = med <= DECODE_TARGET_S
            else:
                row["target"] = "measure() + one call <= budget + 10 plain calls"
                row["met"] = med + one <= budget + 10 * one
            results.append(row)
    write(results, load_before, load_after, a)
    return 0


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "autosdpa_rev": rev}


def write(results, load_before, load_after, a) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    doc = {"date": date, "machine": info, "load_avg_before": load_before, "load_avg_after": load_after,
           "note": "machine shared with other workers while measuring: the load average is part of the result",
           "candidates": ["math", "flash"], "results": results}
    (out / "first_sight_cpu.json").write_text(json.dumps(doc, indent=1))
    lines = [
        "# First-sight cost of `measure()` (CPU)", "",
        f"{date}, {info['cpu']}, {info['cores']} cores, torch {info['torch']}, python {info['python']}, "
        f"autosdpa {info['autosdpa_rev']}. Candidates: math, flash. Median of {a.reps} runs per problem "
        f"(baseline: {a.baseline_reps}), interleaved across problems and contenders, one block per torch thread "
        "count; p25–p75 in brackets. `plain call`: one `F.sdpa` call of the problem (median of 21).",
        "",
        f"**Shared machine**: load average (1, 5, 15 min) {_load(load_before)} before, {_load(load_after)} after, "
        f"on {info['cores']} cores. Every figure moves with the load.", "",
        "| problem | tuner, torch threads | budget | plain call | measure() | × plain call | samples (math / flash) "
        "| winner | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows = r["last"]["rows"]
        samples = " / ".join(f"{rows[b]['samples']}" + ("" if rows[b]["status"] == "ok" else f" ({rows[b]['status']})")
                             for b in ("math", "flash") if b in rows)
        lines.append(f"| {r['problem']} | {r['contender']} | {r['budget_s']:g} s | {_ms(r['plain_call_s'])} | "
                     f"{_ms(r['measure_s_median'])} ({_ms(r['measure_s_p25'])}–{_ms(r['measure_s_p75'])}) | "
                     f"{r['measure_s_median'] / r['plain_call_s']:.0f}× | {samples} | {r['last']['winner']} | "
                     f"{r['target']} | {'yes' if r['met'] else 'no'} |")
    (out / "first_sight_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


def _load(t) -> str:
    return ", ".join(f"{x:.2f}" for x in t)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
