"""Persistence and robustness: reuse across processes, bucketing, a broken database never hurts."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

import autosdpa
from autosdpa import dispatch
from autosdpa.problem import Problem

CHILD = textwrap.dedent("""
    import json, torch, autosdpa
    from autosdpa import dispatch
    calls = []
    real = dispatch.measure
    dispatch.measure = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    q = torch.randn(1, 2, 100, 16)
    out = autosdpa.sdpa(q, q, q, is_causal=True)
    d = autosdpa.explain(q, q, q, is_causal=True)
    print(json.dumps({"tuned": len(calls), "backend": d.backend, "timings": d.timings, "problem": d.problem}))
""")


def run_child(env_extra):
    env = {**os.environ, **env_extra}
    r = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def count_measure(monkeypatch):
    calls = []
    real = dispatch.measure
    monkeypatch.setattr(dispatch, "measure", lambda *a, **k: (calls.append(a[0].query.shape), real(*a, **k))[1])
    return calls


@pytest.mark.slow
def test_second_process_reuses_measurements_without_timing(tmp_path):
    env = {"AUTOSDPA_DB": str(tmp_path / "shared.sqlite")}
    first = run_child(env)
    second = run_child(env)
    assert first["tuned"] == 1 and second["tuned"] == 0
    assert second["backend"] == first["backend"]
    assert second["timings"] == first["timings"]  # the very same stored numbers
    assert "Lq=128" in first["problem"]  # L=100 bucketed


def test_every_backend_measurement_is_stored():
    q = torch.randn(1, 2, 32, 16)
    autosdpa.sdpa(q, q, q)
    rows = dispatch.get_store().rows()
    assert {m.backend for _, _, m in rows} == {"math", "flash"}
    # samples >= 1: the budget (0.02 s in tests) is a hard cap, and a candidate clearly slower than the
    # leader, or slower than the whole budget, keeps just its first samples (see tuner.measure)
    assert all(m.status == "ok" and m.median_s > 0 and m.samples >= 1 and m.max_error is not None
               for _, _, m in rows)


def test_bucketing_shares_one_tuning(monkeypatch):
    calls = count_measure(monkeypatch)
    for L in (100, 120, 128):
        q = torch.randn(1, 2, L, 16)
        torch.testing.assert_close(autosdpa.sdpa(q, q, q), F.scaled_dot_product_attention(q, q, q))
    assert len(calls) == 1
    assert autosdpa.explain(q, q, q).problem.split("|")[5] == "Lq=128"


def test_exact_bucketing(monkeypatch):
    monkeypatch.setenv("AUTOSDPA_BUCKET", "exact")
    autosdpa.reset()
    calls = count_measure(monkeypatch)
    for L in (100, 120):
        q = torch.randn(1, 2, L, 16)
        autosdpa.sdpa(q, q, q)
    assert len(calls) == 2


@pytest.mark.parametrize("native", ["1", "0"])
def test_hit_path_does_not_touch_the_database(monkeypatch, native):
    """Any use of a Store (every method of the class: lookups, snapshots, saves, the user's DB and shared
    layers alike) on a cache hit fails the test."""
    import inspect

    from autosdpa.store import Store

    monkeypatch.setenv("AUTOSDPA_NATIVE", native)
    autosdpa.reset()
    q = torch.randn(1, 2, 16, 8)
    with autosdpa.backend("math", "flash"):  # a Plan on the hot path too, not only plain F.sdpa
        autosdpa.sdpa(q, q, q)
    autosdpa.sdpa(q, q, q)
    used = []
    for name, fn in inspect.getmembers(Store, inspect.isfunction):
        if name not in ("__del__", "__repr__"):
            monkeypatch.setattr(Store, name, lambda *a, _n=name, **k: used.append(_n))
    for _ in range(3):
        autosdpa.sdpa(q, q, q)
        with autosdpa.backend("math", "flash"):
            autosdpa.sdpa(q, q, q)
    assert used == []


def _check_fallback(recwarn_list):
    msgs = [str(w.message) for w in recwarn_list if "autosdpa" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "tuning database unusable" in msgs[0]


@pytest.mark.parametrize("kind", ["garbage", "directory", "readonly", "truncated"])
def test_broken_database_warns_once_and_keeps_working(tmp_path, monkeypatch, kind):
    path = tmp_path / "db.sqlite"
    if kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "directory":
        path.mkdir()
    elif kind == "truncated":
        q = torch.randn(1, 1, 8, 8)
        autosdpa.sdpa(q, q, q)  # make a real DB, then cut it
        autosdpa.reset()
        data = (tmp_path / "autosdpa.sqlite").read_bytes()
        path.write_bytes(data[: len(data) // 3] + b"\0" * 100)
    if kind == "readonly":
        q = torch.randn(1, 1, 8, 8)
        autosdpa.sdpa(q, q, q)
        autosdpa.reset()
        monkeypatch.setenv("AUTOSDPA_DB", f"sqlite:///file:{tmp_path / 'autosdpa.sqlite'}?mode=ro&uri=true")
    else:
        monkeypatch.setenv("AUTOSDPA_DB", str(path))
    autosdpa.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for L in (16, 32, 64):
            q = torch.randn(1, 2, L, 8)
            torch.testing.assert_close(autosdpa.sdpa(q, q, q, is_causal=True),
                                       F.scaled_dot_product_attention(q, q, q, is_causal=True))
    _check_fallback(caught)
    assert autosdpa.explain(q, q, q, is_causal=True).timings["flash"] is not None  # still measured, in memory


def test_record_appends_new_problems(tmp_path, monkeypatch):
    rec = tmp_path / "seen.jsonl"
    monkeypatch.setenv("AUTOSDPA_RECORD", str(rec))
    autosdpa.reset()  # settings are read from the environment once, at import or reset()
    for L in (16, 16, 64):
        q = torch.randn(1, 2, L, 8)
        autosdpa.sdpa(q, q, q)
    lines = [json.loads(x) for x in rec.read_text().splitlines()]
    assert [x["problem"].split("|")[5] for x in lines] == ["Lq=16", "Lq=64"]


def test_locked_database_warns_once_and_keeps_working(tmp_path, monkeypatch):
    import sqlite3

    q = torch.randn(1, 1, 8, 8)
    autosdpa.sdpa(q, q, q)  # create the database
    autosdpa.reset()
    monkeypatch.setenv("AUTOSDPA_DB_TIMEOUT", "0.3")
    holder = sqlite3.connect(str(tmp_path / "autosdpa.sqlite"), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holding the write lock for good
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for L in (16, 32):
                q = torch.randn(1, 2, L, 8)
                torch.testing.assert_close(autosdpa.sdpa(q, q, q), F.scaled_dot_product_attention(q, q, q))
        _check_fallback(caught)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_uncreatable_database_location_falls_back_to_memory(monkeypatch):
    monkeypatch.setenv("AUTOSDPA_DB", "/proc/autosdpa-cannot-exist/db.sqlite")
    autosdpa.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = torch.randn(1, 2, 16, 8)
        autosdpa.sdpa(q, q, q)
    _check_fallback(caught)
    assert autosdpa.explain(q, q, q).timings["flash"] is not None  # tuned, in memory


def test_bad_environment_variables_do_not_break_import(tmp_path):
    env = {**os.environ, "AUTOSDPA_DB": str(tmp_path / "x.sqlite"), "AUTOSDPA_LOG": "verbose",
           "AUTOSDPA_BUDGET": "abc", "AUTOSDPA_BUCKET": "pow3", "AUTOSDPA_MODE": "fast"}
    r = subprocess.run([sys.executable, "-c", "import torch, autosdpa; q = torch.randn(1, 1, 8, 8); "
                        "print(autosdpa.sdpa(q, q, q).shape)"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torch.Size([1, 1, 8, 8])" in r.stdout


def test_a_new_length_in_a_known_bucket_decides_nothing(monkeypatch):
    decided = []
    real = dispatch.eligibility
    monkeypatch.setattr(dispatch, "eligibility", lambda *a, **k: (decided.append(1), real(*a, **k))[1])
    for L in range(17, 33):  # one bucket: Lq = Lk = 32
        q = torch.randn(1, 2, L, 8)
        torch.testing.assert_close(autosdpa.sdpa(q, q, q), F.scaled_dot_product_attention(q, q, q))
    assert len(decided) == 1


def test_a_decode_loop_decides_once_per_power_of_two():
    q = torch.randn(1, 8, 1, 16)
    for L in range(1, 65):
        kv = torch.randn(1, 8, L, 16)
        torch.testing.assert_close(autosdpa.sdpa(q, kv, kv), F.scaled_dot_product_attention(q, kv, kv))
    keys = dispatch.dispatcher.measured_problems()
    assert sorted(Problem.parse(k).lk for k in keys) == [1, 2, 4, 8, 16, 32, 64]


def test_a_plan_shared_in_a_bucket_checks_each_new_shape_even_with_the_same_strides():
    from autosdpa.backends import register, unregister
    from dispatch_helpers import FakeBackend, seed_measurements

    class UpTo20(FakeBackend):  # a kernel with a length limit inside one bucket (Lk 17..32)
        def not_supported_reasons(self, call):
            return [] if call.key.shape[-2] <= 20 else ["Lk above 20"]

    fake = register(UpTo20("upto20"))
    try:
        cache = torch.randn(1, 2, 32, 8)  # a preallocated KV cache: its views keep its strides as Lk grows
        q = torch.randn(1, 2, 1, 8)
        kv18 = cache[:, :, :18]
        seed_measurements(q, kv18, kv18, {"upto20": 1e-4, "flash": 5e-3, "math": 5e-3})
        torch.testing.assert_close(autosdpa.sdpa(q, kv18, kv18), F.scaled_dot_product_attention(q, kv18, kv18))
        assert fake.runs == 1
        kv24 = cache[:, :, :24]  # same bucket, same strides, beyond the kernel's limit
        assert kv24.stride() == kv18.stride()
        torch.testing.assert_close(autosdpa.sdpa(q, kv24, kv24), F.scaled_dot_product_attention(q, kv24, kv24))
        assert fake.runs == 1  # PyTorch ran it
        autosdpa.sdpa(q, cache[:, :, :19], cache[:, :, :19])
        assert fake.runs == 2
    finally:
        unregister("upto20")


def test_warnings_point_at_the_users_call(tmp_path, monkeypatch):
    """A warning from deep inside autosdpa is attributed to the line that called it, not to an internal one."""
    path = tmp_path / "db.sqlite"
    path.write_bytes(os.urandom(4096))  # unusable: one warning, then memory
    monkeypatch.setenv("AUTOSDPA_DB", str(path))
    monkeypatch.setenv("AUTOSDPA_NATIVE", "maybe")  # a bad setting: warned when the settings are read
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        autosdpa.reset()
        q = torch.randn(1, 2, 16, 8)
        autosdpa.sdpa(q, q, q)
    ours = [w for w in caught if "autosdpa" in str(w.message)]
    assert {str(w.message).split(":")[1].strip()[:12] for w in ours} >= {"AUTOSDPA_NAT", "tuning datab"}
    assert all(w.filename == __file__ for w in ours), [(w.filename, w.lineno) for w in ours]
