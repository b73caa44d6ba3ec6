"""The sweep (``autosdpa.sweep``, ``scripts/bench_sweep.py``, ``autosdpa bench --sweep``) runs and reports what it
measured. Tiny ``--quick --dry`` sizes; no assertion on any timing."""
from __future__ import annotations

import importlib.util
import json
import math
import sqlite3
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from autosdpa import sweep, sweep_report
from autosdpa.dispatch import dispatcher
from autosdpa.forms import synthetic_call
from autosdpa.workload import parse_shape

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows_in(db: Path) -> int:
    if not db.exists():
        return 0
    con = sqlite3.connect(str(db))
    try:
        return con.execute("SELECT count(*) FROM measurement").fetchone()[0]
    except sqlite3.OperationalError:  # no table: nothing was ever saved
        return 0
    finally:
        con.close()


def test_dry_quick_sweep_measures_every_contender(tmp_path, monkeypatch):
    user_db = Path(dispatcher.settings.db)
    before = dispatcher.settings
    kept = tmp_path / "kept.sqlite"
    calls = []
    doc = sweep.run_sweep(CPU, quick=True, dry=True, db=str(kept), progress=lambda i, n, name: calls.append(i))
    assert dispatcher.settings is before  # the caller's settings are back
    assert _rows_in(user_db) == 0 and _rows_in(kept) > 0  # tuned into the sweep's database only
    table = sweep.problem_table(CPU, quick=True)
    assert calls == list(range(len(table) + 1))
    assert [r["name"] for r in doc["results"]] == [p.name for p in table]
    assert {r["family"] for r in doc["results"]} >= {"llm-prefill", "llm-decode", "encoder", "training"}
    for r in doc["results"]:
        timed = r["timings_s"]
        backends = {n.removeprefix("backend:") for n in timed if n.startswith("backend:")}
        assert {"default", "autosdpa"} <= set(timed) and "math" in backends
        assert r["oracle"] in backends and r["autosdpa_backend"] in backends | {"pytorch"}
        assert all(s["n"] == r["rounds"] >= 3 and 0 < s["min"] <= s["median"] for s in timed.values())
        ratio = r["autosdpa_vs_default"]
        assert ratio["p25"] <= ratio["median"] <= ratio["p75"] and ratio["noise"] >= 0
        assert r["regression"] == (ratio["median"] > 1 + ratio["noise"])
        assert r["autosdpa_vs_default_of_minima"] == timed["autosdpa"]["min"] / timed["default"]["min"]
        assert r["first_sight_s"] > 0 and r["autosdpa_source"] != "default"  # decided from a measurement
        assert all(e is not None and e < 1e-3 for e in r["max_error"].values())
    assert [r["train"] for r in doc["results"]].count(True) == 1
    s = doc["summary"]
    assert s["problems"] == len(table) and len(s["regressions"]) == sum(r["regression"] for r in doc["results"])
    assert math.isclose(s["speedup_over_default_geomean"] * s["autosdpa_vs_default_geomean"], 1.0)
    assert doc["hot_path"]["rounds"] == 5 and math.isfinite(doc["hot_path"]["overhead_us"])
    assert len(doc["loadavg_start"]) == 3 and doc["machine"]["versions"]["torch"] == torch.__version__
    paths, note = sweep_report.write_outputs(doc, tmp_path / "out", "sweep_cpu", plot=False)
    assert json.loads(paths[0].read_text())["results"][0]["problem"] == doc["results"][0]["problem"]
    md = paths[1].read_text()
    assert all(r["name"] in md for r in doc["results"]) and "| regressions beyond noise | all | 0 |" in md
    assert note == "plot skipped"


def test_sweep_refuses_an_existing_database(tmp_path):
    db = tmp_path / "old.sqlite"
    db.write_text("")
    with pytest.raises(FileExistsError, match="fresh database"):
        sweep.run_sweep(CPU, quick=True, dry=True, db=str(db))


def test_bench_sweep_command_writes_its_files(tmp_path):
    from autosdpa.cli import main

    r = CliRunner().invoke(main, ["bench", "--sweep", "--quick", "--dry", "--no-plot", "--out", str(tmp_path),
                                  "--device", "cpu"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "sweep_cpu.json").read_text())
    assert doc["dry"] and doc["quick"] and len(doc["results"]) == len(sweep.CPU_QUICK)
    assert "regressions beyond noise: goal 0" in r.output and (tmp_path / "sweep_cpu.md").exists()


def test_bench_sweep_rejects_a_workload_and_stray_flags():
    from autosdpa.cli import main

    r = CliRunner().invoke(main, ["bench", "--sweep", "--shape", "lq=8"])
    assert r.exit_code == 2 and "--sweep runs its own problem table" in r.output
    r = CliRunner().invoke(main, ["bench", "--quick", "--shape", "lq=8"])
    assert r.exit_code == 2 and "go with --sweep" in r.output


def test_dry_problem_keeps_the_kind_of_problem():
    for sp in sweep.CPU_TABLE + sweep.CUDA_TABLE:
        p, d = sp.problem, sweep.dry_problem(sp.problem)
        assert (d.dtype, d.causal, d.mask, d.train, d.layout) == (p.dtype, p.causal, p.mask, p.train, p.layout)
        assert d.hq // d.hkv == p.hq // p.hkv and (d.lq == 1) == (p.lq == 1) and (d.lq == d.lk) == (p.lq == p.lk)
        assert p.causal != "bottom_right" or d.lq < d.lk
        assert d.batch * d.hq * d.lq * d.lk * d.d <= 4 * 18 * 20 * 16


def test_tables_cover_the_issue_and_each_problem_once():
    for table in (sweep.CPU_TABLE, sweep.CUDA_TABLE):
        probs = [sp.problem for sp in table]
        assert len({p.key for p in probs}) == len(probs)
        assert {sp.family for sp in table} == {"llm-prefill", "llm-decode", "encoder", "diffusion", "training"}
        assert any(p.gqa or p.hq != p.hkv for p in probs) and any(p.lq == 1 for p in probs)
        assert any(p.causal == "bottom_right" and p.lq < p.lk for p in probs)
        assert any(p.mask.startswith("bool") for p in probs) and any(p.train for p in probs)
    assert {sp.problem.dtype for sp in sweep.CUDA_TABLE} == {"fp16", "bf16", "fp32"}


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_padding_mask_hides_a_tail_per_row(dtype):
    call = synthetic_call(parse_shape(f"b=6,hq=2,lq=5,lk=40,d=8,mask={'bool' if dtype == torch.bool else 'float'}:B11K"),
                          CPU)
    m = sweep.padding_mask(call)
    assert m.shape == (6, 1, 1, 40) and m.dtype == dtype
    attend = m if dtype == torch.bool else m == 0
    lengths = attend.sum(-1).flatten()
    for row, n in zip(attend.view(6, 40), lengths):  # a prefix attends, the tail is padding
        assert n >= 20 and bool(row[:n].all()) and not bool(row[n:].any())
    assert sweep.padding_mask(synthetic_call(parse_shape("lq=4,d=8"), CPU)) is None


def test_runners_compute_what_F_sdpa_computes():
    call = synthetic_call(parse_shape("b=2,hq=4,hkv=2,lq=6,lk=9,d=8,causal=br,train"), CPU)
    fwd = sweep.make_runner(F.scaled_dot_product_attention, call, call.attn_mask, False)()
    ref = F.scaled_dot_product_attention(call.query.detach(), call.key.detach(), call.value.detach(),
                                         call.attn_mask, enable_gqa=True)
    torch.testing.assert_close(fwd, ref)
    grads = sweep.make_runner(sweep.backend_fn("math"), call, call.attn_mask, True)()
    assert [g.shape for g in grads] == [call.query.shape, call.key.shape, call.value.shape]


def test_paired_ratio_noise_and_geomean():
    r = sweep.paired_ratio([2.0, 2.2, 1.8, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0])
    assert r["median"] == 2.0 and r["noise"] == pytest.approx((r["p75"] - r["p25"]) / 2) and r["n"] == 5
    assert sweep.geomean([2.0, 8.0, None, float("nan")]) == pytest.approx(4.0) and sweep.geomean([]) is None


def _doc(first_s, default_s, vs_default, vs_oracle, hot_us, device="cpu"):
    row = {"name": "p", "inference": True, "first_sight_s": first_s, "regression": vs_default > 1.01,
           "timings_s": {"default": {"median": default_s}}, "autosdpa_vs_default": {"median": vs_default},
           "autosdpa_vs_oracle": {"median": vs_oracle}, "oracle_vs_default": {"median": vs_default / vs_oracle}}
    doc = {"budget_s": 0.5, "machine": {"device": device}, "results": [row]}
    doc["summary"] = sweep.summarize([row], {"overhead_us": hot_us}, 0.5)
    return sweep.targets(doc)


def test_targets_are_judged_against_the_issue():
    good = {t["target"]: t for t in _doc(0.04, 0.01, 0.85, 1.01, 0.8, device="cuda")}
    assert all(t["met"] for t in good.values())
    assert all(t["on_this_device"] == (t["applies"] in ("all", "cuda")) for t in good.values())
    bad = {t["target"]: t["met"] for t in _doc(0.61, 0.01, 1.05, 1.05, 1.2)}
    assert not any(bad.values())  # 0.61 s > 0.5 s + 10 x 0.01 s; 5% slower; 1.2 us
    edge = {t["target"]: t["met"] for t in _doc(0.59, 0.01, 1.0, 1.0, 1.0)}
    assert edge["first call ≤ budget (0.5 s) + 10 plain calls"] and edge["hot path added per cache hit"]


def test_e2e_targets_table():
    e2e = _load_script("bench_e2e")
    runs = {"a": [{"empty": {"ratio": r}, "warm_new_process": {"ratio": w}} for r, w in ((1.5, 1.3), (2.5, 1.1),
                                                                                         (1.9, 1.0))],
            "b": [{"first_s": 1.0, "limit_s": 1.2}], "c": [{"ratio": 3.5}],
            "d": [{"exit_s": 0.5, "returncode": 130, "traceback": False},
                  {"exit_s": 0.4, "returncode": 0, "traceback": False}],
            "e": [{"overhead_us": 0.9}]}
    got = [(t["value"], t["met"]) for t in e2e.evaluate(runs)]
    assert got == [(1.9, True), (1.1, True), (pytest.approx(-0.2), True), (3.5, False), (0.45, False), (0.9, True)]


def test_a_backend_alone_runs_one_runner_per_set_of_inputs_and_grad_mode():
    from autosdpa.backends import Backend, register, unregister
    from autosdpa.backends.torch_backends import MATH

    class Recording(Backend):
        name = "recording"
        made = []

        def not_supported_reasons(self, call):
            return []

        def run(self, *args):
            return MATH.run(*args)

        def runner(self, call):
            self.made.append(call.needs_grad)
            return MATH.runner(call)

    register(Recording())
    try:
        fn = sweep.backend_fn("recording")
        q, k, v = (torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(3))
        with torch.no_grad():
            fn(q, k, v), fn(q, k, v)
        out = fn(q, k, v)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
        assert out.requires_grad  # the runner set up for grad, not the no-grad one
        fn(q, k, v)
        fn(*(t.detach().clone() for t in (q, k, v)))
        assert Recording.made == [False, True, False]
    finally:
        unregister("recording")
