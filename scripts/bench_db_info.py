"""Time and peak memory of ``autosdpa db info`` on a large file (issue 9: 1M rows took 86 s and 1.9 GB).

Builds an N-row tuning file (one environment, N/4 problem keys x 4 backends, all valid), then runs
``autosdpa db info FILE --json`` in a child process per code tree given (``--tree``: a source checkout put
first on PYTHONPATH, e.g. this worktree and the main checkout for a before/after), measuring wall time and the
child's peak RSS. Writes JSON + markdown.

    python scripts/bench_db_info.py [--rows 1000000] [--tree .] [--tree /work/main] [--out benchmarks/]
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEY = "fwd|fp32|B=1|Hq=2|Hkv=2|Lq={n}|Lk={n}|D=16|Dv=16|nocausal|mask=none|drop=0|gqa=0|layout=bhld|det=0"
ENV = {"device_type": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "cores": 132,
       "memory_gb": 80, "torch": "2.13.0", "cuda": "12.8", "cudnn": "91000", "triton": "", "kernels": ""}
DDL = """
CREATE TABLE autosdpa_meta (name VARCHAR(64) NOT NULL PRIMARY KEY, value VARCHAR(256) NOT NULL);
CREATE TABLE environment (id INTEGER NOT NULL PRIMARY KEY, fingerprint VARCHAR(64) NOT NULL UNIQUE,
  device_type VARCHAR(16) NOT NULL, device_name VARCHAR(256) NOT NULL, capability VARCHAR(32) NOT NULL,
  cores INTEGER NOT NULL, memory_gb INTEGER NOT NULL, torch VARCHAR(64) NOT NULL, cuda VARCHAR(32) NOT NULL,
  cudnn VARCHAR(32) NOT NULL, triton VARCHAR(32) NOT NULL, kernels VARCHAR(32) NOT NULL, created_at FLOAT NOT NULL);
CREATE TABLE measurement (id INTEGER NOT NULL PRIMARY KEY, environment_id INTEGER NOT NULL REFERENCES environment(id),
  problem_key VARCHAR(512) NOT NULL, backend VARCHAR(64) NOT NULL, status VARCHAR(16) NOT NULL, median_s FLOAT,
  spread_s FLOAT, samples INTEGER NOT NULL, max_error FLOAT, detail TEXT NOT NULL, tuned_shape VARCHAR(512) NOT NULL,
  measured_at FLOAT NOT NULL, CONSTRAINT uq_measurement UNIQUE (environment_id, problem_key, backend));
INSERT INTO autosdpa_meta VALUES ('schema_version', '1');
"""


def build(path: Path, rows: int) -> None:
    fp = hashlib.sha256(json.dumps(ENV, sort_keys=True).encode()).hexdigest()[:16]  # records.fingerprint_of
    con = sqlite3.connect(str(path))
    con.executescript(DDL)
    con.execute("INSERT INTO environment VALUES (1, ?, " + ", ".join("?" * len(ENV)) + ", 0)", (fp, *ENV.values()))
    now = time.time()
    backends = ("math", "flash", "efficient", "cudnn")
    con.executemany("INSERT INTO measurement (environment_id, problem_key, backend, status, median_s, spread_s, "
                    "samples, max_error, detail, tuned_shape, measured_at) VALUES (1, ?, ?, 'ok', 1e-3, 1e-5, 5, 0, "
                    "'', 'q=(1, 2, 8, 16)', ?)",
                    ((KEY.format(n=i + 17), b, now) for i in range(rows // len(backends)) for b in backends))
    con.commit()
    con.close()


def run_info(tree: str, path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree), "OPENBLAS_NUM_THREADS": "1"}
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "autosdpa.cli", "db", "info", str(path), "--json"], env=env,
                             stdout=so, stderr=se, text=True, cwd=os.path.abspath(tree))  # -m: cwd comes first
        _pid, status, usage = os.wait4(p.pid, 0)  # this child's own peak RSS
        wall = time.perf_counter() - t0
        so.seek(0), se.seek(0)
        stdout, stderr = so.read(), se.read()
    code = os.waitstatus_to_exitcode(status)
    out = {"tree": os.path.abspath(tree), "returncode": code, "wall_s": round(wall, 2),
           "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}
    if code == 0:
        out["valid_rows"] = json.loads(stdout)["valid_rows"]
    else:
        out["stderr"] = stderr[-500:]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--tree", action="append", default=None, help="source checkout to run (repeatable)")
    ap.add_argument("--out", default="benchmarks")
    a = ap.parse_args()
    trees = a.tree or ["."]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "big.sqlite"
        t0 = time.perf_counter()
        build(path, a.rows)
        built = time.perf_counter() - t0
        size = path.stat().st_size
        results = [run_info(t, path) for t in trees]
    for r in results:
        print(json.dumps(r), flush=True)
    doc = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "rows": a.rows, "file_mb": round(size / 2**20, 1),
           "build_s": round(built, 1), "python": platform.python_version(), "machine": platform.platform(),
           "cpus": os.cpu_count(), "results": results}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "db_info.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# `autosdpa db info` on a {a.rows:,}-row file ({doc['file_mb']} MB), {doc['date']}", "",
             f"{doc['machine']}, {doc['cpus']} CPUs (shared), Python {doc['python']}.", "",
             "| code | wall time | peak RSS of the process | valid rows |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| `{r['tree']}` | {r['wall_s']} s | {r['peak_rss_mb']} MB | {r.get('valid_rows', r.get('stderr'))} |")
    (out / "db_info.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
