"""Differential fuzzing of autosdpa.sdpa against F.scaled_dot_product_attention, outside pytest.

Runs ``--cases`` hypothesis-generated cases (valid calls, invalid calls, and pairs of calls that share
autosdpa's fast key), each through ``tests/fuzz_cases.check`` (first sight, then the cached plan), records
every failure, shrinks one case of each kind of failure to a minimal repro (printed as code), and writes
``<out>.json`` and ``<out>.md``: machine, versions, date, cases run, failures by kind, time.

    python scripts/fuzz.py --cases 10000 --seed 0 [--out benchmarks/fuzz_cpu]

The cases run in a worker process: a case that aborts the process (PyTorch's CPU flash kernel can corrupt the
heap) is recorded as a failure and a new worker goes on with the remaining cases (next seed). One temporary
tuning database serves each worker; AUTOSDPA_BUDGET defaults to 0.02 s, so first sight is cheap.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THEMES = {"valid": 5, "invalid": 2, "pairs": 3}  # relative weights of the case themes
ABORT = "process abort"


def _setup_env(db: Path) -> None:
    """Before torch loads: one BLAS thread, a fresh database, cheap first sight, no outside layers."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ["AUTOSDPA_DB"] = str(db)
    os.environ.setdefault("AUTOSDPA_BUDGET", "0.02")
    for name in ("AUTOSDPA_MODE", "AUTOSDPA_SHARED_DBS", "AUTOSDPA_RECORD"):
        os.environ.pop(name, None)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import warnings
    warnings.filterwarnings("ignore", category=UserWarning)  # PyTorch's own (e.g. lower-right CausalBias NaNs)


def _parse_case(fc, text: str):
    import math
    return eval(text, {"Case": fc.Case, "Layout": fc.Layout, "Mask": fc.Mask, "nan": math.nan,  # noqa: S307
                       "inf": math.inf})


# -- the worker: runs cases, one JSON line each -----------------------------------------------------------------

def _route(case) -> str:
    """What autosdpa ran for a valid case after first sight (a statistic)."""
    import autosdpa
    try:
        q, k, v, kw = case.build()
        with case.context():
            d = autosdpa.explain(q, k, v, **kw)
        ran = "PyTorch's pick" if d.backend == d.pytorch_choice or d.source == "passthrough" else d.backend
        return f"{ran} (PyTorch: {d.pytorch_choice or 'F.sdpa decides'})"
    except Exception as e:  # noqa: BLE001
        return f"explain raised {type(e).__name__}"


def worker(args) -> int:
    tmp = Path(args.tmp)
    _setup_env(tmp / f"fuzz-{args.seed}.sqlite")
    from hypothesis import HealthCheck, Phase, given, seed, settings
    import fuzz_cases as fc

    current, log = tmp / "current.txt", open(tmp / "cases.jsonl", "a", encoding="utf-8")

    @seed(args.seed)
    @settings(max_examples=args.cases, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(fc.themed_cases(THEMES))
    def fuzz(themed):
        theme, case = themed
        current.write_text(json.dumps({"theme": theme, "case": repr(case)}))
        fails = fc.check_themed(theme, case)
        known = [fc.known_for(theme, case, f) for f in fails]
        row = {"theme": theme, "fails": [[f.kind, f.stage, f.detail] for f, k in zip(fails, known) if not k],
               "known": [k for k in known if k]}
        if row["fails"]:
            row["case"] = repr(case)
        if theme == "valid":
            row["route"] = _route(case)
        log.write(json.dumps(row) + "\n")
        log.flush()

    fuzz()
    current.unlink(missing_ok=True)
    return 0


# -- the shrinker: one small repro per kind of failure ----------------------------------------------------------

def shrink_worker(args) -> int:
    tmp = Path(args.tmp)
    _setup_env(tmp / "shrink-0.sqlite")
    import autosdpa
    import fuzz_cases as fc

    todo = json.loads((tmp / "to_shrink.json").read_text())
    fresh = iter(range(1, 10**9))
    out = []
    for item in todo:
        theme, kind = item["theme"], item["kind"]
        case = _parse_case(fc, item["case"])

        def fails(c) -> bool:  # each try on an empty database and empty caches
            os.environ["AUTOSDPA_DB"] = str(tmp / f"shrink-{next(fresh)}.sqlite")
            autosdpa.reset()
            return any(f.kind == kind for f in fc.check_themed(theme, c))

        shrinker = fc.shrink_pair if theme == "pairs" else fc.shrink
        small = shrinker(case, fails, args.shrink_budget)
        still = fails(small)
        out.append(dict(item, case=repr(small if still else case), reproduces_on_fresh_state=still))
        (tmp / "shrunk.json").write_text(json.dumps(out))
    return 0


def _repro(fc, theme: str, case) -> str:
    if theme != "pairs":
        return case.repro()
    first, second = case
    return (first.repro("first call (valid)") + "\n\n# second call: same fast key, differs in what it leaves out\n"
            + second.repro().split("\n\n", 2)[-1])


# -- the parent: workers, aggregation, report -------------------------------------------------------------------

def _spawn(mode: str, args, tmp: Path, cases: int = 0, seed: int = 0) -> int:
    cmd = [sys.executable, __file__, mode, "--tmp", str(tmp), "--cases", str(cases), "--seed", str(seed),
           "--shrink-budget", str(args.shrink_budget)]
    return subprocess.run(cmd).returncode


def run_cases(args, tmp: Path) -> list[dict]:
    """Every case's row; a worker that dies leaves an ABORT row for its current case, and the next worker
    goes on with the cases left (seed + 1)."""
    seed, rows = args.seed, []
    while True:
        before = _rows(tmp)
        rc = _spawn("--worker", args, tmp, args.cases - len(before), seed)
        rows = _rows(tmp)
        current = tmp / "current.txt"
        if rc == 0 or len(rows) >= args.cases or not current.exists():
            return rows
        cur = json.loads(current.read_text())
        with open(tmp / "cases.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"theme": cur["theme"], "case": cur["case"], "known": [],
                                "fails": [[f"{ABORT} (exit status {rc})", "first", "the process died"]]}) + "\n")
        current.unlink()
        print(f"worker died (exit status {rc}) on: {cur['case']}", flush=True)
        seed += 1


def _rows(tmp: Path) -> list[dict]:
    path = tmp / "cases.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def _versions() -> dict:
    import hypothesis
    import torch
    import autosdpa
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    return {"python": platform.python_version(), "torch": torch.__version__, "hypothesis": hypothesis.__version__,
            "autosdpa": autosdpa.__version__, "commit": commit}


def summarize(rows: list[dict], fc) -> dict:
    note = fc.NOTE
    kinds, known, routes, themes, first = (collections.Counter(), collections.Counter(), collections.Counter(),
                                           collections.Counter(), {})
    for r in rows:
        themes[r["theme"]] += 1
        known.update(r["known"])
        if "route" in r:
            routes[r["route"]] += 1
        for kind, stage, detail in r["fails"]:
            name = None if kind.startswith(ABORT) else fc.known_for(
                r["theme"], _parse_case(fc, r["case"]), fc.Failure(kind, stage, detail))
            if name:  # KNOWN as it is now, not as the worker had it
                known[name] += 1
                continue
            kinds[(r["theme"], kind)] += 1
            first.setdefault((r["theme"], kind), {"theme": r["theme"], "kind": kind, "stage": stage,
                                                  "detail": detail, "case": r["case"]})
    return {
        "cases_run": len(rows), "cases_by_theme": dict(themes),
        "failures": sum(n for (t, k), n in kinds.items() if not k.startswith(note)),
        "failures_by_kind": {f"{t}: {k}": n for (t, k), n in kinds.most_common() if not k.startswith(note)},
        "notes_by_kind": {f"{t}: {k[len(note):]}": n for (t, k), n in kinds.most_common() if k.startswith(note)},
        "known_differences": dict(known.most_common()), "routes_of_valid_cases": dict(routes.most_common()),
        "first": [dict(v, count=kinds[key]) for key, v in first.items()],
    }


def markdown(rep: dict) -> str:
    v, m = rep["versions"], rep["machine"]
    lines = ["# Differential fuzzing: autosdpa vs F.sdpa (CPU)", "",
             f"{rep['date']} · {m['cpu']} ({m['cores']} cores, load {m['load_avg_1m']}) · torch {v['torch']} · "
             f"hypothesis {v['hypothesis']} · autosdpa {v['autosdpa']} ({v['commit']}) · seed {rep['seed']} · "
             f"`python scripts/fuzz.py --cases {rep['cases_requested']} --seed {rep['seed']}`", "",
             f"**{rep['cases_run']} cases** ({', '.join(f'{n} {t}' for t, n in rep['cases_by_theme'].items())}) "
             f"in {rep['time_s']:.0f} s: **{rep['failures']} failures**, "
             f"{sum(rep['known_differences'].values())} known differences, "
             f"{sum(rep['notes_by_kind'].values())} notes (autosdpa right where F.sdpa is wrong).", "",
             "Each case: F.sdpa, then autosdpa twice (first sight, cached plan): values within tolerance "
             "(NaN where F.sdpa has NaN), same output strides, same gradients, same exception types. "
             "Pairs: a valid call, then one with the same fast key differing in what the key leaves out.", ""]
    for title, table in (("Failures by kind", rep["failures_by_kind"]),
                         ("Notes: F.sdpa's pick wrong, autosdpa matches PyTorch's math backend in float64",
                          rep["notes_by_kind"]),
                         ("Known differences (each has a strict xfail in tests/test_fuzz.py)",
                          rep["known_differences"]),
                         ("What ran for the valid cases (after first sight)", rep["routes_of_valid_cases"])):
        lines += [f"## {title}", "", "| what | cases |", "|---|---|"]
        lines += [f"| {k} | {n} |" for k, n in table.items()] or ["| none | 0 |"]
        lines.append("")
    if rep["minimal_repros"]:
        lines += ["## Minimal repros (run from tests/)", ""]
        for r in rep["minimal_repros"]:
            fresh = "" if r.get("reproduces_on_fresh_state") else " (needs what earlier cases left in the caches)"
            lines += [f"### {r['theme']}: {r['kind']} ({r['count']} cases)", "", f"{r['detail']}{fresh}", "",
                      "```python", r["repro"], "```", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "fuzz_cpu"), help="path without .json/.md")
    ap.add_argument("--shrink-budget", type=int, default=150, help="checks per shrunk failure kind")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shrinker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.shrinker:
        return shrink_worker(args)
    tmp = Path(tempfile.mkdtemp(prefix="autosdpa-fuzz-"))
    print(f"fuzzing {args.cases} cases, seed {args.seed}; rows in {tmp / 'cases.jsonl'}", flush=True)
    start = time.time()
    rows = run_cases(args, tmp)
    elapsed = time.time() - start
    _setup_env(tmp / "parent.sqlite")
    import fuzz_cases as fc
    summary = summarize(rows, fc)
    first = summary.pop("first")
    (tmp / "to_shrink.json").write_text(json.dumps([f for f in first if not f["kind"].startswith(ABORT)]))
    _spawn("--shrinker", args, tmp)
    shrunk = {(s["theme"], s["kind"]): s for s in json.loads((tmp / "shrunk.json").read_text())} if (
        tmp / "shrunk.json").exists() else {}
    for db in tmp.glob("*.sqlite*"):  # the rows (cases.jsonl) stay for inspection, the databases go
        db.unlink()
    minimal = []
    for f in first:
        s = shrunk.get((f["theme"], f["kind"]), dict(f, reproduces_on_fresh_state=False))
        case = _parse_case(fc, s["case"])
        minimal.append(dict(s, count=f["count"], repro=_repro(fc, f["theme"], case)))
    rep = {"what": "differential fuzzing of autosdpa.sdpa against F.scaled_dot_product_attention (CPU)",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": _machine(), "versions": _versions(), "seed": args.seed, "cases_requested": args.cases,
           "time_s": round(elapsed, 1), "budget_s": float(os.environ.get("AUTOSDPA_BUDGET", "0.02")),
           **summary, "minimal_repros": minimal}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rep, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rep))
    for r in minimal:
        print(f"\n### {r['theme']}: {r['kind']} ({r['count']} cases)\n{r['detail']}\n{r['repro']}")
    print(f"\n{rep['cases_run']} cases in {elapsed:.0f} s: {rep['failures']} failures, "
          f"{sum(rep['notes_by_kind'].values())} notes, {sum(rep['known_differences'].values())} known "
          f"differences; wrote {out}.json and {out}.md")
    return 1 if rep["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
