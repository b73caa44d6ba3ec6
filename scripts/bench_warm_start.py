"""Tuning time saved by warm start (issue 10, item 3) on this machine's device.

1. "Elsewhere": every problem of the sweep's table is tuned into a fresh database with warm start off; its rows
   are then copied into an environment that differs only in torch's version (``<version>+elsewhere``): the same
   hardware, another fingerprint. That is what a shipped or shared file made under another PyTorch looks like.
2. Per problem and repetition, in alternating order: the problem is tuned into a fresh database holding only
   those rows, once with warm start on and once off. Recorded: the wall time of the tuning (what a first call
   pays on top of its own run), the backends timed, the winner.
3. Reported per problem and in total: medians with / without, the backends not timed, whether the winners agree.

    python scripts/bench_warm_start.py [--device cpu] [--repeat 3] [--budget 1.0] [--quick] [--out benchmarks]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from autosdpa.config import Settings
from autosdpa.dispatch import dispatcher
from autosdpa.records import fingerprint_of
from autosdpa.store import Store
from autosdpa.sweep import machine_info, problem_table


def tune_once(problem, device, db: Path, warm: bool, budget: float) -> dict:
    dispatcher.configure(dataclasses.replace(Settings.from_env(), db=str(db), mode="tune", record=None,
                                             shared_dbs=(), budget_s=budget, warm_start=warm))
    try:
        t0 = time.perf_counter()
        d = dispatcher.tune_problem(problem, device)
        elapsed = time.perf_counter() - t0
        key = problem.bucketed(dispatcher.settings.bucket_threshold).key  # as the dispatcher files it
        rows = dispatcher.store().lookup(dispatcher.environments(device)["torch"][0], key)
        rows.update(dispatcher.store().lookup(dispatcher.environments(device)["kernels"][0], key))
    finally:
        dispatcher.configure(dataclasses.replace(Settings.from_env(), db=":memory:"))
    return {"s": elapsed, "winner": d.backend,
            "timed": sorted(n for n, r in rows.items() if r.samples > 0 or r.status == "rejected"),
            "not_timed": sorted(n for n, r in rows.items() if "warm start" in r.detail)}


def elsewhere_copy(src: Path, dst: Path) -> None:
    """``src``'s rows, each environment's torch version changed: the same hardware, another fingerprint."""
    a, b = Store(src), Store(dst)
    try:
        by_env: dict[str, tuple[dict, list]] = {}
        for env, key, m in a.iter_rows():
            info = {k: v for k, v in env.items() if k != "fingerprint"}
            info["torch"] = f"{info['torch']}+elsewhere"
            by_env.setdefault(fingerprint_of(info), (info, []))[1].append((key, m))
        for fp, (info, rows) in by_env.items():
            b.upsert_many(fp, info, rows)
    finally:
        a.close()
        b.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--quick", action="store_true", help="the sweep's quick subset of problems")
    args = ap.parse_args()
    device = torch.device(args.device)
    problems = problem_table(device, quick=args.quick)
    tmp = Path(tempfile.mkdtemp(prefix="warm_start_"))
    load0 = os.getloadavg()
    elsewhere = tmp / "elsewhere.sqlite"
    for sp in problems:
        tune_once(sp.problem, device, elsewhere, False, args.budget)
    seed = tmp / "seed.sqlite"
    elsewhere_copy(elsewhere, seed)
    results = []
    for i, sp in enumerate(problems):
        runs = {"on": [], "off": []}
        for r in range(args.repeat):
            for mode in (("on", "off") if (i + r) % 2 == 0 else ("off", "on")):
                db = tmp / f"p{i}_r{r}_{mode}.sqlite"
                db.write_bytes(seed.read_bytes())
                runs[mode].append(tune_once(sp.problem, device, db, mode == "on", args.budget))
        on, off = statistics.median(x["s"] for x in runs["on"]), statistics.median(x["s"] for x in runs["off"])
        results.append({"problem": sp.name, "key": sp.problem.key, "warm_s": on, "cold_s": off,
                        "saved": 1 - on / off, "runs": runs,
                        "not_timed": runs["on"][0]["not_timed"], "timed_warm": runs["on"][0]["timed"],
                        "timed_cold": runs["off"][0]["timed"],
                        "winners_agree": all(x["winner"] == runs["off"][0]["winner"]
                                             for x in runs["on"] + runs["off"])})
        print(f"{sp.name}: warm {on * 1e3:.0f} ms, cold {off * 1e3:.0f} ms, not timed {results[-1]['not_timed']}",
              flush=True)
    total_on, total_off = sum(r["warm_s"] for r in results), sum(r["cold_s"] for r in results)
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine_info(device), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
           "budget_s": args.budget, "repeat": args.repeat, "total_warm_s": total_on, "total_cold_s": total_off,
           "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"warm_start_{device.type}"
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    m = doc["machine"]
    lines = [f"# Warm start: tuning time with and without rows from another torch version ({device.type})", "",
             f"{doc['date']}; {m['device_name']}, {m['torch_threads']} torch threads; torch {m['versions']['torch']}; "
             f"budget {args.budget} s; {args.repeat} runs per problem and mode, alternating, medians. Load average "
             f"{load0[0]:.1f} at start, {doc['loadavg_end'][0]:.1f} at end.", "",
             "The seed rows are this machine's own measurements filed under torch `<version>+elsewhere`: the same "
             "hardware, another fingerprint. Warm start times the candidates within 25% of the best there, PyTorch's "
             "pick and any never measured there; each is still checked against the reference.", "",
             "| problem | tuning, warm start | tuning, all timed | saved | not timed | winners agree |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['problem']} | {r['warm_s'] * 1e3:.0f} ms | {r['cold_s'] * 1e3:.0f} ms | {r['saved']:.0%} | "
                     f"{', '.join(r['not_timed']) or '-'} | {'yes' if r['winners_agree'] else '**no**'} |")
    lines += ["", f"Total: {total_on:.2f} s with warm start, {total_off:.2f} s without "
                  f"({1 - total_on / total_off:.0%} saved)."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
