"""Warm start (autosdpa.warm): rows of the same hardware under other software rank the candidates; only those
within reach are timed, each still checked, and the rest are timed after all when none of those passes."""
from __future__ import annotations

import pytest
import torch

import autosdpa
from autosdpa.backends import Call, register, unregister
from autosdpa.backends.torch_backends import pytorch_choice
from autosdpa.dispatch import dispatcher
from autosdpa.problem import Problem
from autosdpa.records import Measurement, fingerprint_of
from autosdpa.warm import split

from dispatch_helpers import FakeBackend, qkv

OLD = {"device_type": "cuda", "device_name": "GPU", "torch": "2.12.0", "triton": "3.5.0"}
NEW = {**OLD, "torch": "2.13.0"}


def ok(t):
    return Measurement("x", "ok", t, t / 100, 10)


def test_split_times_what_is_within_reach_the_baseline_and_the_unknown():
    near = {"flash": (ok(1.0), OLD), "cudnn": (ok(1.2), OLD), "efficient": (ok(2.0), OLD), "math": (ok(9.0), OLD),
            "triton_flash": (Measurement("triton_flash", "rejected", detail="max error 0.3"), OLD)}
    names = ["flash", "cudnn", "efficient", "math", "triton_flash", "brand_new"]
    keep, why = split(names, near, "efficient", {n: NEW for n in names})
    assert keep == ["flash", "cudnn", "efficient", "brand_new"]  # 1.2 <= 1.25x; efficient is PyTorch's pick
    assert set(why) == {"math", "triton_flash"}
    assert why["math"].startswith("not timed (warm start): 9.00x slower than flash")
    assert "torch 2.12.0 → 2.13.0" in why["math"] and "rejected (max error 0.3)" in why["triton_flash"]


def test_split_without_a_passing_row_elsewhere_times_everything():
    names = ["flash", "math"]
    assert split(names, {}, "flash", {}) == (names, {})
    bad = {"flash": (Measurement("flash", "rejected"), OLD)}
    assert split(names, bad, None, {}) == (names, {})


def _near_env(device):
    """This machine's environment with another torch version: the same hardware, another fingerprint."""
    info = dict(dispatcher.environments(device)["torch"][1], torch="1.0.0")
    return fingerprint_of(info), info


def _seed_near(q, times: dict[str, float]) -> str:
    key = Problem.from_call(Call(q, q, q), dispatcher.settings.bucket_threshold).key
    fp, info = _near_env(q.device)
    dispatcher.store().save(fp, info, key, [Measurement(n, "ok", t, t / 100, 10) for n, t in times.items()])
    return key


def test_dispatcher_times_only_the_ranked_candidates_and_records_why_the_rest_were_not():
    q, _, _ = qkv(L=24)
    pick = pytorch_choice(Call(q, q, q))
    other = "math" if pick == "flash" else "flash"
    key = _seed_near(q, {pick: 1e-5, other: 1e-3})
    autosdpa.sdpa(q, q, q)
    rows = dispatcher.store().lookup(dispatcher.environments(q.device)["torch"][0], key)
    assert rows[pick].status == "ok" and rows[pick].samples >= 1
    assert rows[other].status == "skipped" and "warm start" in rows[other].detail
    assert "100.00x slower" in rows[other].detail and "torch 1.0.0 →" in rows[other].detail
    assert autosdpa.explain(q, q, q).backend == pick


def test_warm_start_off_times_everything(monkeypatch):
    monkeypatch.setenv("AUTOSDPA_WARM_START", "0")
    autosdpa.reset()
    q, _, _ = qkv(L=24)
    key = _seed_near(q, {"flash": 1e-5, "math": 1e-3})
    autosdpa.sdpa(q, q, q)
    rows = dispatcher.store().lookup(dispatcher.environments(q.device)["torch"][0], key)
    assert rows["flash"].status == "ok" and rows["math"].status == "ok"


@pytest.fixture
def wrong_backend():
    b = register(FakeBackend("wrong_here", fn=lambda q, k, v, *a: torch.zeros_like(q)))
    yield b
    unregister(b.name)


def test_when_no_ranked_candidate_passes_the_others_are_timed_after_all(wrong_backend):
    """Right elsewhere, wrong here: it is rejected and math, ranked far behind, is timed and wins."""
    q, _, _ = qkv(L=24)
    key = Problem.from_call(Call(q, q, q), dispatcher.settings.bucket_threshold).key
    fp, info = _near_env(q.device)
    kfp, kinfo = dispatcher.environments(q.device)["kernels"]
    kinfo = dict(kinfo, torch="1.0.0")
    dispatcher.store().save(fingerprint_of(kinfo), kinfo, key, [Measurement("wrong_here", "ok", 1e-6, 1e-8, 10)])
    dispatcher.store().save(fp, info, key, [Measurement("math", "ok", 1e-3, 1e-5, 10)])
    with autosdpa.backend("wrong_here", "math"):
        out = autosdpa.sdpa(q, q, q)
        assert autosdpa.explain(q, q, q).backend == "math"
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert wrong_backend.runs >= 1
    rows = {**dispatcher.store().lookup(kfp, key),
            **dispatcher.store().lookup(dispatcher.environments(q.device)["torch"][0], key)}
    assert rows["wrong_here"].status == "rejected" and rows["math"].status == "ok"


def test_a_skipped_row_is_filed_under_the_environment_its_backend_depends_on(wrong_backend):
    """A backend of ours that warm start does not time gets its `skipped` row in the kernels environment."""
    q, _, _ = qkv(L=24)
    key = Problem.from_call(Call(q, q, q), dispatcher.settings.bucket_threshold).key
    fp, info = _near_env(q.device)
    kinfo = dict(dispatcher.environments(q.device)["kernels"][1], torch="1.0.0")
    dispatcher.store().save(fingerprint_of(kinfo), kinfo, key, [Measurement("wrong_here", "ok", 1e-1, 1e-3, 10)])
    dispatcher.store().save(fp, info, key, [Measurement("math", "ok", 1e-3, 1e-5, 10)])
    with autosdpa.backend("wrong_here", "math"):
        autosdpa.sdpa(q, q, q)
    envs = dispatcher.environments(q.device)
    mine = dispatcher.store().lookup_own(envs["kernels"][0], key)
    assert mine["wrong_here"].status == "skipped" and "warm start" in mine["wrong_here"].detail
    assert wrong_backend.runs == 0 and "wrong_here" not in dispatcher.store().lookup_own(envs["torch"][0], key)


def test_the_setting():
    from autosdpa.config import Settings

    assert Settings.from_env({}).warm_start is True
    assert Settings.from_env({"AUTOSDPA_WARM_START": "0"}).warm_start is False
    with pytest.warns(RuntimeWarning, match="AUTOSDPA_WARM_START='maybe' is not 0 or 1; using '1'"):
        assert Settings.from_env({"AUTOSDPA_WARM_START": "maybe"}).warm_start is True


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_pytorchs_own_pick_for_a_nestedtensor_problem_is_always_timed():
    """Issue 17, item 7: for jagged calls PyTorch's pick is its NJT path (njt_pytorch), not the dense pick
    (None): ranked far behind elsewhere, it is timed all the same, never left with a `skipped` row."""
    from autosdpa.forms import jagged as nested

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.nested.nested_tensor([torch.randn(n, 2, 8, generator=g) for n in (5, 12, 3)],
                                          layout=torch.jagged).transpose(1, 2) for _ in range(3))
    call = nested.make_call(q, k, v)
    assert nested.pytorch_choice(call) == "njt_pytorch" and pytorch_choice(call) is None
    key = nested.problem_of(call, dispatcher.settings.bucket_threshold).key
    fp, info = _near_env(q.device)
    dispatcher.store().save(fp, info, key, [Measurement("njt_pytorch", "ok", 1e-2, 1e-4, 10),
                                            Measurement("njt_padded", "ok", 1e-4, 1e-6, 10),
                                            Measurement("njt_split", "ok", 1e-2, 1e-4, 10)])
    d = autosdpa.explain(q, k, v)
    rows = dispatcher.store().lookup(dispatcher.environments(q.device)["torch"][0], key)
    assert d.source == "tuned" and d.pytorch_choice == "njt_pytorch"
    assert rows["njt_pytorch"].status == "ok" and rows["njt_pytorch"].samples >= 1
    assert rows["njt_split"].status == "skipped" and "warm start" in rows["njt_split"].detail  # warm start is on
    assert rows["njt_padded"].status == "ok"
