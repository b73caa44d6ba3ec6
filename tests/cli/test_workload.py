"""Workload parsing (in-process, no tuning): shape specs, files, presets, recordings, sharding."""
from __future__ import annotations

import json

import pytest

from autosdpa import workload as W
from autosdpa.problem import Problem


def test_shape_spec_fields_and_defaults():
    p = W.parse_shape("b=8,hq=32,hkv=8,lq=4096,lk=4096,d=128,dtype=bf16,causal,train")
    assert p == Problem(dtype="bf16", batch=8, hq=32, hkv=8, lq=4096, lk=4096, d=128, dv=128, causal="top_left",
                        gqa=True, train=True)
    p = W.parse_shape("lq=100")
    assert (p.batch, p.hq, p.hkv, p.lk, p.d, p.dv, p.dtype, p.causal, p.gqa) == (1, 1, 1, 100, 64, 64, "fp32",
                                                                                 "none", False)
    assert W.parse_shape("lq=4", default_dtype="bf16").dtype == "bf16"
    p = W.parse_shape("batch=2, h=4, l=64, lk=77, head_dim=40, dv=32, half, causal=br, dropout=0.1, det, "
                      "layout=blhd")
    assert (p.batch, p.hq, p.lq, p.lk, p.d, p.dv, p.dtype, p.causal, p.dropout, p.deterministic, p.layout) == (
        2, 4, 64, 77, 40, 32, "fp16", "bottom_right", True, True, "blhd")
    assert W.parse_shape("lq=8,mask=bool:B11K").mask == "bool:B11K"
    assert W.parse_shape("lq=8,dropout=0").dropout is False
    key = W.parse_shape("hq=4,hkv=2,lq=1,lk=64").key
    assert W.parse_shape(key).key == key  # a full problem key is a spec too


@pytest.mark.parametrize("spec, words", [
    ("", "empty"),
    ("b=0,lq=4", "positive integer"),
    ("lq=x", "positive integer"),
    ("hq=2", "lq (query length) is required"),
    ("lq=4,foo=1", "unknown field 'foo'"),
    ("lq=4,lq=5", "given twice"),
    ("lq", "needs a value"),
    ("lq=4,dtype=int8", "unknown dtype"),
    ("lq=4,causal=sideways", "causal="),
    ("lq=4,mask=bool:XYZW", "PATTERN"),
    ("lq=4,causal,mask=bool:B11K", "cannot be combined"),
    ("hq=3,hkv=2,lq=4", "multiple of hkv"),
    ("hq=4,hkv=2,lq=4,gqa=0", "needs gqa"),
    ("lq=4,layout=zigzag", "layout"),
    ("lq=4,dropout=2", "probability"),
    ("fwd|bf16|B=1", "malformed problem key"),
])
def test_bad_specs_say_why(spec, words):
    with pytest.raises(W.WorkloadError, match=None) as e:
        W.parse_shape(spec)
    assert words in str(e.value)


def test_toml_and_json_files_expand_lists(tmp_path):
    toml = tmp_path / "w.toml"
    toml.write_text('name = "x"\n[defaults]\ndtype = "fp16"\nhq = 4\nd = 32\n'
                    '[[problems]]\nlabel = "self {lq}"\nlq = [16, 32]\ncausal = true\n'
                    '[[problems]]\nshape = "hq=2,lq=8"\n'
                    '[[problems]]\nkey = "fwd|fp32|B=1|Hq=1|Hkv=1|Lq=4|Lk=4|D=8|Dv=8|nocausal|mask=none|drop=0|'
                    'gqa=0|layout=bhld|det=0"\n')
    items = W.load_file(toml)
    assert [it.label for it in items] == ["self 16", "self 32", "", ""]
    assert [it.problem.lq for it in items] == [16, 32, 8, 4]
    assert items[0].problem.dtype == "fp16" and items[0].problem.causal == "top_left"
    assert items[2].problem.hq == 2 and items[2].problem.d == 32  # spec over defaults
    assert items[3].problem.dtype == "fp32"
    js = tmp_path / "w.json"
    js.write_text(json.dumps({"defaults": {"d": 16}, "problems": [{"hq": 2, "lq": [8, 9]}, "lq=5,train"]}))
    items = W.load_file(js)
    assert [(it.problem.lq, it.problem.train, it.problem.d) for it in items] == [(8, False, 16), (9, False, 16),
                                                                                (5, True, 16)]
    js.write_text(json.dumps([{"lq": 3}]))
    assert W.load_file(js)[0].problem.lq == 3


@pytest.mark.parametrize("name, text, words", [
    ("bad.toml", "[[problems]\n", "invalid TOML"),
    ("bad.json", "{", "invalid JSON"),
    ("empty.toml", "name = 'x'\n", "no problems"),
    ("odd.toml", "[[problems]]\nlq = 4\nwat = 1\n", "problem 1: unknown field 'wat'"),
    ("top.json", '{"problemz": []}', "unknown top-level keys"),
    ("w.yaml", "lq: 4", "unknown workload format"),
])
def test_bad_files_say_why(tmp_path, name, text, words):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(W.WorkloadError) as e:
        W.load_file(f)
    assert words in str(e.value)


def test_presets_load_and_cite_sources():
    presets = {p["name"]: p for p in W.list_presets()}
    assert {"llama3-8b", "gpt2-small", "vit-b16", "whisper-large-v3", "sd15-unet", "tiny"} <= set(presets)
    for p in presets.values():
        assert p["source"] and p["problems"] > 0
    llama = W.load_preset("llama3-8b")
    assert all(it.problem.hq == 32 and it.problem.hkv == 8 and it.problem.d == 128 for it in llama)
    assert any(it.problem.train for it in llama) and any(it.problem.lq == 1 for it in llama)
    sd = W.load_preset("sd15-unet")
    assert {it.problem.d for it in sd} == {40, 80, 160} and {it.problem.lk for it in sd} >= {77, 4096}
    assert {it.problem.lq for it in W.load_preset("vit-b16")} == {197}
    assert {it.problem.lk for it in W.load_preset("whisper-large-v3")} >= {1500, 448}
    with pytest.raises(W.WorkloadError, match="unknown preset 'nope'; available: .*llama3-8b"):
        W.load_preset("nope")


def test_recording(tmp_path):
    k1 = W.parse_shape("hq=2,lq=32,d=16").key
    k2 = W.parse_shape("hq=2,lq=64,d=16,train").key
    f = tmp_path / "rec.jsonl"
    f.write_text(json.dumps({"problem": k1, "time": 1}) + "\n\n" + json.dumps({"problem": k2, "time": 2})
                 + '\n{"problem": "fwd|tru')  # a truncated last line (program killed mid-write) is skipped
    items = W.load_recording(f)
    assert [it.problem.key for it in items] == [k1, k2] and items[1].origin == "rec.jsonl:3"
    f.write_text('{"problem": "garbage"}\n' + json.dumps({"problem": k1}) + "\n")
    with pytest.raises(W.WorkloadError, match="rec.jsonl:1: malformed problem key"):
        W.load_recording(f)
    f.write_text("")
    with pytest.raises(W.WorkloadError, match="no recorded problems"):
        W.load_recording(f)


def test_overrides_dedupe_and_shards():
    items = [W.WorkItem(W.parse_shape(f"hq=2,lq={n},d=16")) for n in (17, 20, 32, 33, 64, 100, 128, 300)]
    assert len(W.dedupe_canonical(items)) == 4  # buckets 32, 64, 128, 512
    over = W.apply_overrides(items[:2], dtype="bf16", train=True)
    assert all(it.problem.dtype == "bf16" and it.problem.train for it in over)
    many = [W.WorkItem(W.parse_shape(f"hq={h},lq={n},d=16")) for h in (1, 2, 4, 8) for n in (1, 2, 3, 4, 5, 6)]
    parts = [W.shard(many, i, 3) for i in range(3)]
    assert sorted(it.problem.key for p in parts for it in p) == sorted(it.problem.key for it in many)
    assert all(parts) and W.shard(many, 1, 3) == parts[1]  # deterministic
    assert W.parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2", "1"):
        with pytest.raises(W.WorkloadError):
            W.parse_shard(bad)


def test_spec_fields_are_the_key_fields():
    """One table: every field of the problem key is a shape-spec field, in the key's order, and back."""
    from autosdpa.cli._common import shapes_help, short_key
    from autosdpa.problem import FIELDS as KEY_FIELDS, Problem

    assert list(W.FIELDS) == [f.spec for f in KEY_FIELDS]
    listed = [line.split()[0] for line in shapes_help().splitlines() if line.startswith("  ") and "(default: " in line]
    assert listed == list(W.FIELDS)
    p = W.parse_shape("b=3,hq=8,hkv=2,lq=40,lk=72,d=16,dv=32,dtype=bf16,mask=bool:B11K,dropout,layout=blhd,det,train")
    assert Problem.parse(p.key) == p
    assert short_key(p.key) == "fwdbwd bf16 B=3 H=8/2 L=40/72 D=16 Dv=32 mask=bool:B11K dropout layout=blhd det"
    j = W.parse_shape("b=2,lq=64,d=16,layout=jagged,tokens=100")
    assert j.tokens == 100 and Problem.parse(j.key) == j and "tok=100" in short_key(j.key)
    with pytest.raises(W.WorkloadError, match="mask="):
        W.parse_shape("lq=4,mask=bool:BHQ")
