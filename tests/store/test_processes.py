"""Real processes: many ranks tuning into one database, kill -9 mid-write, torch.distributed agreement."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from autosdpa.problem import Problem
from autosdpa.store import Store

from .helpers import env

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHILD = os.path.join(ROOT, "tests", "store", "children.py")
N_PROCS = 8


def _env(db: str, **extra) -> dict:
    e = {**os.environ, "AUTOSDPA_DB": db, "AUTOSDPA_BUDGET": "0.02", "OPENBLAS_NUM_THREADS": "1",
         "OMP_NUM_THREADS": "1", "AUTOSDPA_MODE": "tune", "PYTHONPATH": ROOT, **extra}
    e.pop("AUTOSDPA_SHARED_DBS", None)
    e.pop("AUTOSDPA_RECORD", None)
    return e


def test_many_processes_tune_into_one_database(any_db):
    lengths = [8, 16, 32, 64, 128, 256]
    procs = []
    start = time.perf_counter()
    for i in range(N_PROCS):  # overlapping problems: each process sees 3 of the 6, every problem >= 4 processes
        mine = ",".join(str(lengths[(i + j) % len(lengths)]) for j in range(3))
        procs.append(subprocess.Popen([sys.executable, CHILD, "tune", mine], env=_env(any_db), cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        assert "locked" not in err.lower() and "Traceback" not in err, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    elapsed = time.perf_counter() - start
    print(f"\n{N_PROCS} processes tuning into {any_db.split(':')[0]}: {elapsed:.1f} s")
    expected = set()
    for r in results:
        assert r["warnings"] == [], r["warnings"]
        assert r["store"].split("/")[-1] == any_db.split("/")[-1]  # never fell back to memory
        for key, backends in r["measured"].items():
            expected.update((key, b) for b in backends)
    s = Store(any_db)
    rows = s.rows()
    s.close()
    have = {(k, m.backend) for _e, k, m in rows}
    assert len({e["fingerprint"] for e, _k, _m in rows}) == 1
    assert len({k for k, _b in expected}) == len(lengths)
    assert expected <= have and len(have) == len(rows)
    if any_db.startswith("sqlite"):
        con = sqlite3.connect(any_db.split("///", 1)[1])
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()


def test_kill_9_mid_write_keeps_committed_rows(tmp_path):
    path = tmp_path / "crash.sqlite"
    url = "sqlite:///" + str(path)
    last = -1
    for cycle in range(2):
        p = subprocess.Popen([sys.executable, CHILD, "save_loop", url], env=_env(url, START=str(last + 1)), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = None
        for line in p.stdout:
            last = int(line)
            t0 = t0 or time.monotonic()
            if time.monotonic() - t0 > 0.5 + 0.37 * cycle:  # an arbitrary point of a write-heavy loop
                break
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        p.stdout.close(), p.stderr.close()
        assert p.returncode == -signal.SIGKILL
        con = sqlite3.connect(str(path))
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()
    assert last > 10
    fp, _info = env("crash test device")
    s = Store(url)
    for i in range(last + 1):  # every save reported as committed is there, complete
        assert set(s.lookup(fp, Problem(lq=i + 1, lk=7).key)) == {"math", "flash", "efficient"}, i
    s.close()


def test_distributed_ranks_agree(tmp_path):
    shared = str(tmp_path / "shared.sqlite")
    init = str(tmp_path / "dist_init")
    procs = [subprocess.Popen([sys.executable, CHILD, "distributed", str(r), "2", init, shared,
                               str(tmp_path / f"rank{r}.sqlite")], env=_env(shared), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    res = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        res.append(json.loads(out.strip().splitlines()[-1]))
    r0, r1 = res
    assert (r0["own_pick"], r1["own_pick"]) == ("math", "flash")
    # one database: the same backend on both ranks, exactly one of them overruled
    assert r0["shared"][0] == r1["shared"][0]
    assert sorted(r["shared"][1] for r in res).count("agreed") == 1
    # separate databases: different until sync_decisions(), then rank 0's decision everywhere
    assert (r0["separate_before"], r1["separate_before"]) == ("math", "flash")
    assert (r0["synced"], r1["synced"]) == (0, 1)
    assert r0["separate_after"][0] == r1["separate_after"][0] == "math"
    assert r1["separate_after"][1] == "agreed"
