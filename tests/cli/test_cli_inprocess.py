"""Argument handling that needs no child process: errors, exit codes, --help, --dry-run, listings."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from autosdpa.cli import main

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
    assert [p["key"].split("|")[:2] for p in json.loads(r.output)] == [["fwdbwd", "bf16"]] * 2
    r = invoke("tune", "--dry-run", "--preset", "llama3-8b")
    assert r.exit_code == 0 and "Hq=32|Hkv=8" in r.output


def test_presets_listing():
    r = invoke("tune", "--list-presets")
    assert r.exit_code == 0 and "llama3-8b" in r.output and "sd15-unet" in r.output
    r = invoke("presets", "vit-b16")
    assert r.exit_code == 0 and "L=197/197" in r.output and "patch_size 16" in r.output
    r = invoke("presets", "--json")
    assert {p["name"] for p in json.loads(r.output)} >= {"tiny", "gpt2-small", "whisper-large-v3"}
