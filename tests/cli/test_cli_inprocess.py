"""Argument handling that needs no child process: errors, exit codes, --help, --dry-run, listings."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from autosdpa.cli import main
from autosdpa.problem import Problem

from .conftest import TINY


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("cmd", ["tune", "show", "explain", "bench", "doctor", "presets"])
def test_every_command_has_help_with_an_example(cmd):
    r = invoke(cmd, "--help")
    assert r.exit_code == 0
    assert "Example" in r.output


@pytest.mark.parametrize("args, words", [
    (["tune", "--shape", "b=0,lq=4"], "Invalid value for --shape: 'b=0,lq=4': b='0': expected a positive integer"),
    (["tune", "--shape", "lq=4,whatever=3"], "unknown field 'whatever'"),
    (["tune", "--preset", "nope"], "unknown preset 'nope'; available:"),
    (["tune", "--file", "/no/such/workload.toml"], "no such file: /no/such/workload.toml"),
    (["tune", "--from", "/no/such/rec.jsonl"], "no such file: /no/such/rec.jsonl"),
    (["tune", "--shape", TINY, "--dtype", "int4"], "unknown dtype 'int4'"),
    (["tune", "--shape", TINY, "--device", "tpu"], "--device"),
    (["tune", "--shape", TINY, "--device", "cuda:0"], "CUDA is not available"),
    (["tune", "--shape", TINY, "--devices", "0,1"], "CUDA is not available"),
    (["tune", "--shape", TINY, "--devices", "a,b"], "expected CUDA device indices"),
    (["tune", "--shape", TINY, "--shard", "3/2"], "0 <= I < N"),
    (["tune"], "no problems given"),
    (["explain"], "Missing option '--shape'"),
    (["explain", "--shape", "lq=4,causal=maybe"], "causal="),
    (["bench", "--preset", "nope"], "unknown preset"),
    (["presets", "nope"], "unknown preset"),
    (["doctor", "--device", "cuda"], "CUDA is not available"),
])
def test_bad_input_clear_message_and_usage_exit_code(args, words):
    import torch

    if torch.cuda.is_available() and "CUDA is not available" in words:
        pytest.skip("this machine has CUDA")
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert words in r.output


def test_bad_workload_file_message(tmp_path):
    f = tmp_path / "w.toml"
    f.write_text("[[problems]]\nlq = 0\n")
    r = invoke("tune", "--file", str(f))
    assert r.exit_code == 2 and "w.toml: problem 1: lq=0: expected a positive integer" in r.output


def test_dry_run_lists_every_input_kind_sharded(tmp_path):
    toml = tmp_path / "w.toml"
    toml.write_text('[[problems]]\nhq = 2\nlq = 48\nd = 16\n')
    js = tmp_path / "w.json"
    js.write_text(json.dumps({"problems": ["hq=2,lq=200,d=16"]}))
    rec = tmp_path / "rec.jsonl"
    rec.write_text(json.dumps({"problem": "fwd|fp32|B=1|Hq=3|Hkv=3|Lq=8|Lk=8|D=16|Dv=16|nocausal|mask=none|"
                                          "drop=0|gqa=0|layout=bhld|det=0", "time": 0}) + "\n")
    args = ["tune", "--dry-run", "--json", "--shape", TINY, "--file", str(toml), "--file", str(js), "--preset",
            "tiny", "--from", str(rec)]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    origins = [p["origin"] for p in plan]
    assert origins[0] == "--shape" and "w.toml#1" in origins and "w.json#1" in origins
    assert any(o.startswith("preset tiny") for o in origins) and "rec.jsonl:1" in origins
    assert [p["key"] for p in plan if p["origin"] == "w.toml#1"] == [
        "fwd|fp32|B=1|Hq=2|Hkv=2|Lq=64|Lk=64|D=16|Dv=16|nocausal|mask=none|drop=0|gqa=0|layout=bhld|det=0"]
    # --shape TINY and the preset's "self L=32" are one problem: listed once
    assert len({p["key"] for p in plan}) == len(plan)
    shards = [json.loads(invoke(*args, "--shard", f"{i}/2").output) for i in range(2)]
    assert sorted(p["key"] for s in shards for p in s) == sorted(p["key"] for p in plan)
    r = invoke(*args, "--dtype", "bf16", "--train", "--limit", "2")
    parsed = [Problem.parse(p["key"]) for p in json.loads(r.output)]
    assert [(p.train, p.dtype) for p in parsed] == [(True, "bf16")] * 2
    r = invoke("tune", "--dry-run", "--preset", "llama3-8b")
    assert r.exit_code == 0 and "Hq=32|Hkv=8" in r.output


def test_presets_listing():
    r = invoke("tune", "--list-presets")
    assert r.exit_code == 0 and "llama3-8b" in r.output and "sd15-unet" in r.output
    r = invoke("presets", "vit-b16")
    assert r.exit_code == 0 and "L=197/197" in r.output and "patch_size 16" in r.output
    r = invoke("presets", "--json")
    assert {p["name"] for p in json.loads(r.output)} >= {"tiny", "gpt2-small", "whisper-large-v3"}


# -- edges (issue 9, item 10) ------------------------------------------------------------------------------------

def _user_db(tmp_path):
    from autosdpa.records import fingerprint_of
    from autosdpa.records import Measurement
    from autosdpa.store import Store

    info = {"device_type": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "cores": 132,
            "memory_gb": 80, "torch": "2.13.0", "cuda": "12.8", "cudnn": "91000", "triton": "", "kernels": ""}
    key = "fwd|fp32|B=1|Hq=2|Hkv=2|Lq=8|Lk=8|D=16|Dv=16|nocausal|mask=none|drop=0|gqa=0|layout=bhld|det=0"
    db = tmp_path / "user.sqlite"
    s = Store(str(db))
    s.save(fingerprint_of(info), info, key, [Measurement("math", "ok", 1e-3, 1e-5, 10),
                                             Measurement("flash", "ok", 5e-4, 1e-5, 10)])
    s.close()
    return db


@pytest.mark.parametrize("where", ["parent_is_a_file", "proc"])
def test_export_to_an_impossible_place_is_an_error_not_a_traceback(tmp_path, where):
    db = _user_db(tmp_path)
    (tmp_path / "afile").write_text("x")
    out = str(tmp_path / "afile" / "x.sqlite") if where == "parent_is_a_file" else "/proc/nope/x.sqlite"
    r = CliRunner().invoke(main, ["db", "export", "--db", str(db), "-o", out])
    assert r.exit_code == 1, r.output
    assert r.output.startswith("Error: cannot write") and "Traceback" not in r.output and r.exception is not None
    assert isinstance(r.exception, SystemExit)


def test_bad_database_from_the_environment_is_like_db_option(tmp_path):
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00not a database" * 100)
    by_env = CliRunner().invoke(main, ["show"], env={"AUTOSDPA_DB": str(garbage)})
    by_opt = CliRunner().invoke(main, ["show", "--db", str(garbage)])
    for r in (by_env, by_opt):
        assert r.exit_code == 1 and "Error: cannot use the database" in r.output and "not an SQLite" in r.output
    assert "(AUTOSDPA_DB)" in by_env.output and "(--db)" in by_opt.output


def test_show_unknown_backend_is_a_bad_parameter(tmp_path):
    db = _user_db(tmp_path)
    r = CliRunner().invoke(main, ["show", "--db", str(db), "--backend", "nope,math"])
    assert r.exit_code == 2 and "unknown backend 'nope'" in r.output
    r = CliRunner().invoke(main, ["show", "--db", str(db), "--backend", "math", "--json"])
    assert r.exit_code == 0 and {row["backend"] for row in json.loads(r.output)} == {"math"}


def test_gpu_filter_and_deprecated_device_alias(tmp_path):
    db = _user_db(tmp_path)
    r = CliRunner().invoke(main, ["show", "--db", str(db), "--gpu", "h100", "--json"])
    assert r.exit_code == 0 and len(json.loads(r.output)) == 2
    r = CliRunner().invoke(main, ["show", "--db", str(db), "--gpu", "a100", "--json"])
    assert r.exit_code == 0 and json.loads(r.output) == []
    r = CliRunner().invoke(main, ["show", "--db", str(db), "--device", "H100"])  # output has stderr in it
    assert r.exit_code == 0 and "--device is deprecated here" in r.output and "flash" in r.output
    out = tmp_path / "h.sqlite"
    r = CliRunner().invoke(main, ["db", "export", "--db", str(db), "--device", "h100", "-o", str(out)])
    assert r.exit_code == 0 and "added 2" in r.output


def test_doctor_json():
    r = CliRunner().invoke(main, ["doctor", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["device"] == "cpu" and doc["environment"]["device_type"] == "cpu"
    assert doc["environment"]["triton"] == "" and doc["kernels_environment"]["kernels"]
    assert {"math", "flash"} <= {b["backend"] for b in doc["backends"] if b["available"]}
    from autosdpa.backends import all_backends
    assert sorted(b["backend"] for b in doc["backends"]) == sorted(b.name for b in all_backends())
    assert doc["free_memory_bytes"] > 0
    assert "database" in doc and isinstance(doc["shared"], list)


def test_prune_reports_what_it_did(tmp_path):
    db = _user_db(tmp_path)
    r = CliRunner().invoke(main, ["db", "prune", "--db", str(db), "--failed"])
    assert r.exit_code == 0 and r.output.strip() == "removed 0 rows and 0 environments; kept 2 rows"


def test_prune_default_drops_what_this_machine_can_never_match(tmp_path):
    from autosdpa.environment import environment
    from autosdpa.records import Measurement, fingerprint_of
    from autosdpa.store import Store

    key = "fwd|fp32|B=1|Hq=2|Hkv=2|Lq=8|Lk=8|D=16|Dv=16|nocausal|mask=none|drop=0|gqa=0|layout=bhld|det=0"
    fp_now, now = environment("cpu")
    old = {**now, "torch": "2.0.0"}
    db = tmp_path / "user.sqlite"
    s = Store(str(db))
    s.save(fp_now, now, key, [Measurement("math", "ok", 1e-3, 1e-5, 10)])
    s.save(fingerprint_of(old), old, key, [Measurement("math", "ok", 1e-3, 1e-5, 10)])
    s.close()
    r = CliRunner().invoke(main, ["db", "prune", "--db", str(db), "--dry-run"])
    assert r.exit_code == 0 and r.output.startswith("would remove 1 rows and 1 environments; kept 1 rows")
    assert f"would drop {fingerprint_of(old)[:8]}" in r.output and "torch 2.0.0 older than the installed" in r.output
    r = CliRunner().invoke(main, ["db", "prune", "--db", str(db)])
    assert r.exit_code == 0 and "dropped" in r.output
    s = Store(str(db))
    assert {e["fingerprint"] for e in s.environments()} == {fp_now}
    s.close()


def test_bench_with_an_unwritable_out_fails_before_any_timing(tmp_path, monkeypatch):
    import autosdpa.api

    afile = tmp_path / "afile"
    afile.write_text("")
    tuned = []
    monkeypatch.setattr(autosdpa.api, "tune", lambda *a, **k: tuned.append(1) or [])
    for bad in (str(afile / "x"), "/proc/nope/x"):
        r = invoke("bench", "--shape", "hq=2,lq=16,d=16", "--device", "cpu", "--out", bad)
        assert r.exit_code == 1 and "cannot write results to" in r.output
    assert tuned == []


def test_doctor_says_which_hot_path_runs(monkeypatch):
    import autosdpa
    from autosdpa import fastkey

    def hot_path():
        return json.loads(invoke("doctor", "--device", "cpu", "--json").output)["hot_path"]

    assert hot_path().startswith("C fast key" if fastkey.native_available() else "Python (the C fast key is not")
    monkeypatch.setenv("AUTOSDPA_NATIVE", "0")
    autosdpa.reset()
    assert hot_path().startswith("Python (")
