"""Who wins: autosdpa.mode, autosdpa.backend, PyTorch's sdpa flags, then the measurement."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import autosdpa
from autosdpa import dispatch
from autosdpa.dispatch import dispatcher
from autosdpa.policy import Overrides
from dispatch_helpers import qkv, ran, seed_measurements
from autosdpa.backends import Call
from autosdpa.backends.torch_backends import torch_flags
from autosdpa.environment import environment
from autosdpa.problem import Problem

def test_forced_backend_is_the_one_that_runs():
    q, k, v = qkv()
    for name in ("math", "flash"):
        with autosdpa.backend(name):
            assert ran(autosdpa.sdpa, q, k, v) == {name}
            assert autosdpa.explain(q, k, v).backend == name
    assert torch_flags() == (True, True, True, True)


def test_restricted_backends_choose_among_them():
    q, k, v = qkv()
    with autosdpa.backend(["math", "flash"]):
        d = autosdpa.explain(q, k, v)
        assert d.backend in ("math", "flash")
        assert set(k_ for k_, t in d.timings.items() if t is not None) == {"math", "flash"}
        assert ran(autosdpa.sdpa, q, k, v) == {d.backend}


def test_forced_ineligible_backend_raises_with_reason():
    q, k, v = qkv()
    with autosdpa.backend("efficient"), pytest.raises(RuntimeError, match="no CPU efficient"):
        autosdpa.sdpa(q, k, v)
    with autosdpa.backend("flash"), pytest.raises(RuntimeError, match="dropout"):
        autosdpa.sdpa(q, k, v, dropout_p=0.5)
    with pytest.raises(ValueError, match="unknown autosdpa backend"):
        with autosdpa.backend("nope"):
            pass


def test_sdpa_kernel_math_is_honoured():
    q, k, v = qkv()
    seed_measurements(q, k, v, {"flash": 1e-6, "math": 1.0})  # flash "wins" unless the flags say otherwise
    with sdpa_kernel(SDPBackend.MATH):
        assert ran(autosdpa.sdpa, q, k, v) == {"math"}
        d = autosdpa.explain(q, k, v)
        assert d.backend == "math" and "PyTorch's sdpa flags" in d.reason
    assert ran(autosdpa.sdpa, q, k, v) == {"flash"}


def test_enable_flash_sdp_false_is_honoured():
    q, k, v = qkv()
    prev = torch.backends.cuda.flash_sdp_enabled()
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        assert ran(autosdpa.sdpa, q, k, v) == {"math"}
    finally:
        torch.backends.cuda.enable_flash_sdp(prev)


def test_priority_order_defers_to_pytorch():
    q, k, v = qkv()
    seed_measurements(q, k, v, {"flash": 1.0, "math": 1e-6})
    assert ran(autosdpa.sdpa, q, k, v) == {"math"}  # measured winner, not PyTorch's pick
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH], set_priority=True):
        assert ran(autosdpa.sdpa, q, k, v) == {"flash"}
        assert "priority" in autosdpa.explain(q, k, v).reason
    # every backend in the order: the flags (and so the fast key) are as before, the cached plan must defer
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(order, set_priority=True):
        assert ran(autosdpa.sdpa, q, k, v) == {"flash"}


def test_measured_winner_runs_and_flags_are_restored():
    q, k, v = qkv(L=24)
    seed_measurements(q, k, v, {"flash": 5e-3, "math": 1e-3})
    assert ran(autosdpa.sdpa, q, k, v) == {"math"}
    assert torch_flags() == (True, True, True, True)
    d = autosdpa.explain(q, k, v)
    assert d.backend == "math" and d.source in ("database", "cache") and "faster" in d.reason
    torch.testing.assert_close(autosdpa.sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_near_tie_goes_to_pytorch_choice_and_needs_no_flag_toggling():
    q, k, v = qkv(L=40)
    seed_measurements(q, k, v, {"flash": 1.01e-3, "math": 1.0e-3})  # math 1% faster: noise
    assert ran(autosdpa.sdpa, q, k, v) == {"flash"}
    assert "near-tie" in autosdpa.explain(q, k, v).reason
    # the hot-path plan for PyTorch's own pick is "call F.sdpa directly": no flag save/set/restore
    assert dispatcher.cached_plans() == [None]


def test_mode_off_and_lookup():
    q, k, v = qkv(L=48)
    with autosdpa.mode("off"):
        autosdpa.sdpa(q, k, v)
        assert autosdpa.explain(q, k, v).source == "passthrough"
    with autosdpa.mode("lookup"):
        autosdpa.sdpa(q, k, v)
        d = autosdpa.explain(q, k, v)
        assert d.source == "default" and d.backend == "flash"
    assert dispatch.get_store().counts()["measurements"] == 0  # neither mode timed anything
    with pytest.raises(ValueError):
        with autosdpa.mode("fast"):
            pass


def test_env_mode(monkeypatch):
    monkeypatch.setenv("AUTOSDPA_MODE", "lookup")
    autosdpa.reset()
    q, k, v = qkv(L=56)
    autosdpa.sdpa(q, k, v)
    assert dispatch.get_store().counts()["measurements"] == 0


def test_overrides_nest_and_restore():
    with autosdpa.mode("lookup"):
        with autosdpa.backend("math"):
            assert dispatcher.overrides == Overrides("lookup", ("math",))
        assert dispatcher.overrides == Overrides("lookup", None)
    assert dispatcher.overrides == Overrides()


def test_patch_routes_torch_functional_and_mha():
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 10, 16)
    with torch.no_grad():
        ref = mha(x, x, x, need_weights=False)[0]
    with autosdpa.patch():
        assert F.scaled_dot_product_attention is autosdpa.sdpa
        with torch.no_grad():
            out = mha(x, x, x, need_weights=False)[0]
        assert dispatch.get_store().counts()["measurements"] > 0  # MHA's attention went through autosdpa
    assert F.scaled_dot_product_attention is dispatch.pytorch_sdpa
    torch.testing.assert_close(out, ref)


def test_learned_mask_gets_its_gradient_and_keeps_our_kernels_out():
    from autosdpa.backends import Backend, register, unregister

    class Fake(Backend):  # stands in for a Triton kernel that gives the mask no gradient
        name = "fake_kernel"

        def not_supported_reasons(self, call):
            return []

        def run(self, q, k, v, m=None, dp=0.0, ic=False, sc=None, gqa=False):
            return F.scaled_dot_product_attention(q, k, v, None if m is None else m.detach(), dp, ic, scale=sc)
    register(Fake())
    try:
        q, k, v = qkv(L=12)
        bias = torch.randn(1, 2, 12, 12, requires_grad=True)
        d = autosdpa.explain(q, k, v, attn_mask=bias)
        assert "fake_kernel" in d.rejected and "mask" in d.rejected["fake_kernel"]
        autosdpa.sdpa(q, k, v, attn_mask=bias).sum().backward()
        b2 = bias.detach().clone().requires_grad_()
        F.scaled_dot_product_attention(q, k, v, attn_mask=b2).sum().backward()
        torch.testing.assert_close(bias.grad, b2.grad)
        with torch.no_grad():  # the same mask without grad: our kernels are candidates again
            assert "fake_kernel" not in autosdpa.explain(q, k, v, attn_mask=bias.detach()).rejected
    finally:
        unregister("fake_kernel")


def test_deterministic_mode_is_part_of_the_key():
    q, k, v = qkv(L=20)
    autosdpa.sdpa(q, k, v)
    assert autosdpa.explain(q, k, v).problem.endswith("det=0")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        autosdpa.sdpa(q, k, v)
        assert autosdpa.explain(q, k, v).problem.endswith("det=1")
        assert len(dispatcher.cached_plans()) == 2
    finally:
        torch.use_deterministic_algorithms(prev)


def test_invalid_call_does_not_pin_its_fast_key():
    q, k, _ = qkv(L=16)
    bad_v = torch.randn(1, 2, 17, 8)
    with pytest.raises(RuntimeError):
        autosdpa.sdpa(q, k, bad_v)
    v = torch.randn(1, 2, 16, 8)  # same fast key (q and k shapes), valid
    autosdpa.sdpa(q, k, v)  # first sight of the valid call: tunes
    assert ran(autosdpa.sdpa, q, k, v) == {"flash"}


def test_threads_running_toggling_plans_leave_the_flags_alone():
    import threading

    q, k, v = qkv(L=28)
    seed_measurements(q, k, v, {"flash": 5e-3, "math": 1e-3})  # math wins: its plan toggles the flags
    q2, k2, v2 = qkv(L=36)
    errors = []

    def work(args):
        try:
            for _ in range(300):
                autosdpa.sdpa(*args)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=work, args=((q, k, v) if i % 2 else (q2, k2, v2),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert torch_flags() == (True, True, True, True)


def test_zero_median_row_from_elsewhere_is_ignored():
    q, k, v = qkv(L=44)
    seed_measurements(q, k, v, {"flash": 1e-3, "math": 1e-3})
    key = Problem.from_call(Call(q, k, v)).key
    fp, info = environment(q.device)
    import sqlalchemy as sa
    store = dispatch.get_store()
    with store.engine.begin() as c:  # a hand-edited row: a median of zero would win every comparison
        c.execute(sa.text("UPDATE measurement SET median_s = 0 WHERE backend = 'math' AND problem_key = :k"),
                  {"k": key})
    d = autosdpa.explain(q, k, v)  # the bad row is skipped: math counts as unmeasured and is timed afresh
    assert d.timings["math"] is not None and d.timings["math"] > 0
