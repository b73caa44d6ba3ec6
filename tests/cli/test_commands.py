"""Each ``autosdpa`` command run for real, as a child process, on the CPU against a temp database.

One module-scoped database is filled by one `autosdpa tune` run over every input kind (shape, TOML file,
JSON file, preset, recording made by actually running a program with AUTOSDPA_RECORD); the other commands
read it. Child processes are kept few: each one imports torch (~3 s).
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from .conftest import child_env, db_keys, run_cli

RECORD_PROGRAM = """
import torch, autosdpa
q = torch.randn(1, 3, 40, 16)
autosdpa.scaled_dot_product_attention(q, q, q)
autosdpa.scaled_dot_product_attention(q, q, q, is_causal=True)
autosdpa.scaled_dot_product_attention(q, q, q)  # seen before: recorded once
"""


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """Run the recording program, then one `autosdpa tune --json` over all input kinds."""
    d = tmp_path_factory.mktemp("cli")
    db = d / "tuned.sqlite"
    rec = d / "rec.jsonl"
    # lookup mode: the program records what it sees without tuning anything
    subprocess.run([sys.executable, "-c", RECORD_PROGRAM], env=child_env(d / "prog.sqlite", AUTOSDPA_RECORD=str(rec),
                                                                        AUTOSDPA_MODE="lookup"),
                   check=True, timeout=120)
    lines = [json.loads(x) for x in rec.read_text().splitlines()]
    assert len(lines) == 2 and all("Hq=3" in x["problem"] for x in lines)
    toml = d / "w.toml"
    toml.write_text('[defaults]\nd = 16\n[[problems]]\nlabel = "from toml"\nhq = 5\nlq = 24\n')
    js = d / "w.json"
    js.write_text(json.dumps({"problems": [{"label": "from json", "hq": 6, "lq": 8, "d": 16, "train": True}]}))
    r = run_cli(["tune", "--shape", "b=1,hq=7,lq=32,d=16,causal", "--file", str(toml), "--file", str(js),
                 "--preset", "tiny", "--from", str(rec), "--json"], db)
    assert r.returncode == 0, r.stderr
    return {"db": db, "rec": rec, "lines": lines, "out": json.loads(r.stdout), "stderr": r.stderr}


def test_tune_every_input_kind(tuned):
    out = tuned["out"]
    assert out["interrupted"] is False and out["device"] == "cpu"
    rows = out["results"]
    origins = [r["origin"] for r in rows]
    assert origins[0] == "--shape" and "w.toml#1" in origins and "w.json#1" in origins
    assert sum(o.startswith("preset tiny") for o in origins) == 4
    assert sum(o.startswith("rec.jsonl:") for o in origins) == 2
    assert len(rows) == 9
    stored = db_keys(tuned["db"])
    for r in rows:
        assert r["error"] is None
        assert r["winner"] in ("math", "flash")
        assert r["problem"] in stored and {"math", "flash"} <= stored[r["problem"]]
        assert r["timings"][r["winner"]] > 0 and r["source"] == "tuned"
    assert [r["label"] for r in rows if r["origin"] == "w.json#1"] == ["from json"]
    assert next(r for r in rows if r["origin"] == "w.json#1")["problem"].startswith("fwdbwd|")
    assert "tuning" in tuned["stderr"]  # the progress bar goes to stderr; stdout is JSON only


def test_tune_from_recording(tuned, cli_db):
    r = run_cli(["tune", "--from", str(tuned["rec"]), "--json"], tuned["db"])
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["results"]
    assert [x["problem"] for x in rows] == [x["problem"] for x in tuned["lines"]]
    assert all(x["source"] == "database" for x in rows)  # already tuned by the fixture's run: not re-timed


def test_tune_table_output(tuned):
    r = run_cli(["tune", "--shape", "b=1,hq=7,lq=32,d=16,causal", "--shape", "hq=2,lq=8,d=16,dropout"],
                tuned["db"])
    assert r.returncode == 0, r.stderr
    for words in ("winner", "PyTorch default", "speedup", "H=7/7 L=32/32 D=16 causal", "already in the database",
                  "rejected", "flash: Both", "not available on this"):
        assert words in r.stdout, words


def test_show(tuned):
    r = run_cli(["show", "--key", "*Hq=7*", "--backend", "math,flash", "--gpu", "cpu"], tuned["db"])
    assert r.returncode == 0, r.stderr
    assert "H=7/7 L=32/32 D=16 causal" in r.stdout and "★" in r.stdout and "Hq=5" not in r.stdout
    for col in ("problem", "backend", "status", "median", "samples", "error", "env"):
        assert col in r.stdout


def test_explain(tuned):
    r = run_cli(["explain", "--shape", "b=1,hq=7,lq=32,d=16,causal"], tuned["db"])
    assert r.returncode == 0, r.stderr
    assert "choice:" in r.stdout and "PyTorch would run:" in r.stdout
    assert "math" in r.stdout and "flash" in r.stdout and "unavailable on this device: efficient" in r.stdout


def test_bench(tuned, tmp_path):
    try:
        import matplotlib  # noqa: F401
        has_mpl = True
    except ImportError:
        has_mpl = False
    outdir = tmp_path / "bench"
    r = run_cli(["bench", "--preset", "tiny", "--limit", "2", "--shape", "hq=2,lq=16,d=16,train", "--seconds",
                 "0.05", "--out", str(outdir), "--json"], tuned["db"])
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert json.loads((outdir / "bench.json").read_text()) == doc
    assert {"date", "machine", "versions", "single_backend", "summary", "results"} <= set(doc)
    assert doc["versions"]["torch"] and doc["machine"]["device_type"] == "cpu"
    assert len(doc["results"]) == 2  # --limit counts across inputs: the --shape, then the first preset problem
    assert doc["results"][0]["train"] is True and doc["results"][1]["label"] == "tiny: self L=32"
    for res in doc["results"]:
        assert res["pytorch_s"] > 0 and res["autosdpa_s"] > 0 and res["single_s"] > 0 and res["rounds"] >= 5
    md = (outdir / "bench.md").read_text()
    assert "geometric mean" in md
    for res in doc["results"]:  # the spread of each speedup, and whether it is noise
        for which in ("autosdpa", "single"):
            lo, hi = res[f"{which}_speedup_p25"], res[f"{which}_speedup_p75"]
            assert lo <= hi and res[f"{which}_within_noise"] == (lo <= 1 <= hi)
    noise = [r[f"{w}_within_noise"] for r in doc["results"] for w in ("autosdpa", "single")]
    assert ("(within noise)" in md) == any(noise)
    if has_mpl:
        assert (outdir / "bench.png").stat().st_size > 1000
    else:
        assert "matplotlib is not installed" in r.stderr and not (outdir / "bench.png").exists()


def table_rows(text: str) -> list[list[str]]:
    """The cells of every row of the rich tables in ``text`` (``│ a │ b │`` lines)."""
    return [[c.strip() for c in line.strip().strip("│").split("│")] for line in text.splitlines()
            if line.lstrip().startswith("│")]


def test_doctor(cli_db):
    """Every registered backend has a row, available or not with PyTorch's or the kernel's reason; the
    database is a table, not a Python dict; doctor creates no database."""
    from autosdpa.api import unavailable_reasons
    from autosdpa.backends import all_backends

    r = run_cli(["doctor", "--device", "cpu"], cli_db)
    assert r.returncode == 0, r.stderr
    registered = {b.name for b in all_backends()}
    why = unavailable_reasons("cpu")
    rows = {cells[0]: cells[1:] for cells in table_rows(r.stdout) if len(cells) == 3 and cells[0] in registered}
    assert set(rows) == registered, r.stdout
    for name, (available, why_not) in rows.items():
        assert (available, why_not) == (("no", why[name]) if name in why else ("yes", "")), name
    assert {"math", "flash"} <= {n for n, (a, _) in rows.items() if a == "yes"}
    assert "{" not in r.stdout and "measurements" in r.stdout and "not created yet" in r.stdout
    assert not cli_db.exists()


def test_bad_spec_exit_code_in_a_child(cli_db):
    r = run_cli(["tune", "--shape", "b=0,lq=4"], cli_db)
    assert r.returncode == 2
    assert "Invalid value for --shape" in r.stderr and "expected a positive integer" in r.stderr
    assert r.stdout == ""


# The real CLI, except that tuning the second problem first waits: SIGINT then always lands mid-run,
# however fast the machine tunes (a fast CI runner once finished all three before the signal arrived).
STALLING_CLI = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a suite run in the background inherits SIGINT ignored
from autosdpa import api
from autosdpa.cli import main
real_tune, seen = api.tune, []
def stalling_tune(*a, **k):
    seen.append(1)
    if len(seen) == 2:
        time.sleep(300)
    return real_tune(*a, **k)
api.tune = stalling_tune
main(prog_name="autosdpa", args=sys.argv[1:])
"""


def test_ctrl_c_keeps_finished_problems(cli_db):
    """SIGINT after the first problem's rows landed: exit 130, partial table, those rows kept."""
    shapes = ["hq=2,lq=24,d=16", "hq=2,lq=40,d=16", "hq=2,lq=72,d=16"]
    keys = [f"fwd|fp32|B=1|Hq=2|Hkv=2|Lq={n}|Lk={n}|D=16|Dv=16|nocausal|mask=none|drop=0|gqa=0|layout=bhld|det=0"
            for n in (32, 64, 128)]
    args = ["tune", "--budget", "1.5"] + [x for s in shapes for x in ("--shape", s)]
    p = subprocess.Popen([sys.executable, "-c", STALLING_CLI] + args, env=child_env(cli_db), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while keys[0] not in db_keys(cli_db):
            assert p.poll() is None, p.communicate()
            assert time.time() < deadline, "first problem never saved"
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "interrupted" in out and "interrupted" in err
    assert "1/3 problems" in out and "L=32/32" in out and "L=64/64" not in out  # partial table: what finished
    stored = db_keys(cli_db)
    assert {"math", "flash"} <= stored[keys[0]] and keys[1] not in stored and keys[2] not in stored


def test_worker_processes_split_a_workload(cli_db, monkeypatch):
    """The --devices machinery (one spawned worker per device, one shared queue), run with two CPU workers."""
    from rich.progress import Progress

    from autosdpa import workload as W
    from autosdpa.cli.tune import _run_workers
    from autosdpa.tuner import TuneConfig

    import os

    from autosdpa.config import Settings

    monkeypatch.setenv("AUTOSDPA_DB", str(cli_db.parent / "not-this-one.sqlite"))  # workers must not read it
    settings = Settings(db=str(cli_db), budget_s=0.02)
    items = [W.WorkItem(W.parse_shape(f"hq=2,lq={n},d=16"), f"L={n}") for n in (8, 12, 16, 32)]
    rows: list[dict] = []
    before = dict(os.environ)
    with Progress(disable=True) as progress:
        task = progress.add_task("", total=len(items))
        _run_workers(items, ["cpu", "cpu"], False, TuneConfig(budget_s=0.02), rows, progress, task,
                     settings=settings)
    assert dict(os.environ) == before  # the database went to the workers as an argument
    assert [r["label"] for r in rows] == ["L=8", "L=12", "L=16", "L=32"]  # workload order, whoever ran it
    assert all(r["error"] is None and r["winner"] for r in rows)
    assert {r["problem"] for r in rows} <= set(db_keys(cli_db))
    assert not (cli_db.parent / "not-this-one.sqlite").exists()
