"""Runners: what a plan calls for one layout, set up once (checks, mask strides, tile config, grid). Each must
compute exactly what the checked path computes, for new data in that layout on every call."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right

from kernel_ref import make_qkv

pytest.importorskip("triton")
from autosdpa_kernels import _common, flash  # noqa: E402
from autosdpa_kernels import launch as klaunch  # noqa: E402

from autosdpa.backends.base import Call  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore:Lower right causal bias")]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _flash_cases():
    def plain(seed):
        return (*make_qkv(1, 2, 2, 9, 20, 32, device=DEV, seed=seed), {})

    def causal(seed):
        return (*make_qkv(1, 2, 2, 12, 12, 16, device=DEV, seed=seed), {"is_causal": True})

    def lower_right(seed):
        return (*make_qkv(1, 2, 2, 9, 20, 16, device=DEV, seed=seed), {"attn_mask": causal_lower_right(9, 20)})

    def bool_mask_broadcast(seed):
        g = torch.Generator().manual_seed(seed)
        m = (torch.rand(1, 1, 9, 20, generator=g) > 0.3).to(DEV)
        return (*make_qkv(1, 2, 2, 9, 20, 32, device=DEV, seed=seed), {"attn_mask": m})

    def float_mask_2d(seed):
        g = torch.Generator().manual_seed(seed)
        return (*make_qkv(1, 2, 2, 9, 20, 32, device=DEV, seed=seed), {"attn_mask": torch.randn(9, 20, generator=g)
                                                                        .to(DEV)})

    def gqa_blhd_fp16(seed):
        return (*make_qkv(2, 4, 2, 10, 24, 32, dtype=torch.float16, device=DEV, layout="blhd", seed=seed),
                {"enable_gqa": True})

    def last_dim_strided(seed):  # the runner copies these, as the checked path does
        q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2)
                   for t in make_qkv(1, 2, 2, 8, 16, 16, device=DEV, seed=seed))
        return q, k, v, {}

    def three_d_mask(seed):
        q, k, v = (t[0] for t in make_qkv(1, 2, 2, 9, 20, 32, device=DEV, seed=seed))
        g = torch.Generator().manual_seed(seed)
        return q, k, v, {"attn_mask": (torch.rand(2, 9, 20, generator=g) > 0.3).to(DEV)}
    return {f.__name__: f for f in (plain, causal, lower_right, bool_mask_broadcast, float_mask_2d, gqa_blhd_fp16,
                                    last_dim_strided, three_d_mask)}


def _decode_cases():
    def gqa(seed):
        return (*make_qkv(2, 8, 2, 1, 100, 64, device=DEV, seed=seed), {"enable_gqa": True})

    def lower_right_fp16(seed):
        return (*make_qkv(1, 4, 4, 3, 50, 32, dtype=torch.float16, device=DEV, seed=seed),
                {"attn_mask": causal_lower_right(3, 50)})

    def bool_mask(seed):
        g = torch.Generator().manual_seed(seed)
        m = (torch.rand(2, 1, 1, 100, generator=g) > 0.2).to(DEV)
        return (*make_qkv(2, 8, 2, 1, 100, 64, device=DEV, seed=seed), {"attn_mask": m, "enable_gqa": True})
    return {f.__name__: f for f in (gqa, lower_right_fp16, bool_mask)}


CASES = [("triton_flash", n, f) for n, f in _flash_cases().items()] + \
        [("triton_decode", n, f) for n, f in _decode_cases().items()]


def _args(kw, scale):
    return (kw.get("attn_mask"), 0.0, kw.get("is_causal", False), scale, kw.get("enable_gqa", False))


@pytest.mark.parametrize("name,case,build", CASES, ids=[f"{b}-{n}" for b, n, _ in CASES])
def test_runner_matches_the_checked_path_on_new_data(name, case, build):
    from autosdpa.backends import get
    backend = get(name)
    q, k, v, kw = build(0)
    run = backend.runner(Call(q, k, v, **kw))
    assert run != backend.run  # set up for this layout, not the checked path
    with torch.no_grad():
        for seed, scale in ((0, None), (1, 0.3), (2, None)):  # new tensors (and masks) of the same layout
            q, k, v, kw = build(seed)
            got = run(q, k, v, *_args(kw, scale))
            want = backend.run(q, k, v, *_args(kw, scale))
            assert got.shape == want.shape and got.dtype == want.dtype
            assert torch.equal(got, want), (case, seed)


def test_runners_are_set_up_for_forward_calls_only():
    from autosdpa.backends import get
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, device=DEV)
    flash_backend = get("triton_flash")
    assert flash_backend.runner(Call(q, k, v, needs_grad=True)) == flash_backend.run  # training: the checked path
    assert flash_backend.runner(Call(q, k, v)) != flash_backend.run


def test_a_runner_gives_up_when_the_tf32_setting_changes():
    from autosdpa.backends import get
    matmul = torch.backends.cuda.matmul
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, device=DEV)
    backend = get("triton_flash")
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        run = flash.forward_runner(q, k, v)
        backend_run = backend.runner(Call(q, k, v))
        run(q, k, v, None, None)
        matmul.allow_tf32 = True
        with pytest.raises(ValueError, match="TF32"):
            run(q, k, v, None, None)
        assert torch.equal(backend_run(q, k, v), backend.run(q, k, v))  # falls back to the checked path
    finally:
        matmul.allow_tf32 = before


class _FakeKernel:
    def __init__(self, calls, name):
        self.calls, self.name = calls, name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, args))


class _FakeKernels:
    def __init__(self):
        self.calls = []
        self.AUTOTUNED = {}

    def __getattr__(self, name):
        return _FakeKernel(self.calls, name)


def test_a_runner_counts_for_ready_once_it_launched_and_passes_each_calls_tensors(monkeypatch):
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setattr(_common, "device_reason", lambda t, describe=False: None)
    monkeypatch.setenv("AUTOSDPA_KERNEL_CONFIGS", "one")
    fake = _FakeKernels()
    monkeypatch.setattr(flash, "_kernels", lambda: fake)
    klaunch.forget()
    q, k, v = make_qkv(1, 2, 2, 64, 64, 64, dtype=torch.float16)
    run = flash.forward_runner(q, k, v, causal="top_left")
    assert not flash.ready(q, k, v, causal="top_left")  # set up, nothing launched yet
    q2, k2, v2 = make_qkv(1, 2, 2, 64, 64, 64, dtype=torch.float16, seed=1)
    out = run(q2, k2, v2, None, 0.5)
    assert flash.ready(q, k, v, causal="top_left")
    (name, args), = fake.calls
    assert name == "attn_fwd_kernel"
    assert args[0] is q2 and args[1] is k2 and args[2] is v2 and args[4] is out
    assert args[flash.FWD_ARGS.index("qk_scale")] == pytest.approx(0.5 * _common.LOG2E)


def test_a_forced_kernel_runs_through_one_runner_per_shape_in_a_decode_loop(monkeypatch):
    import torch.nn.functional as F

    import autosdpa
    from autosdpa.backends import get
    from autosdpa_kernels import decode
    made = []
    real = decode.forward_runner
    monkeypatch.setattr(decode, "forward_runner", lambda *a, **kw: (made.append(a[1].shape), real(*a, **kw))[1])
    backend = get("triton_decode")
    q, cache_k, cache_v = make_qkv(1, 8, 2, 1, 40, 32, device=DEV)  # a KV cache: its views keep its strides
    with torch.no_grad(), autosdpa.backend("triton_decode"):
        for L in (18, 19, 24):  # one bucket
            k, v = cache_k[:, :, :L], cache_v[:, :, :L]
            for _ in range(2):
                out = autosdpa.sdpa(q, k, v, enable_gqa=True)
                assert torch.equal(out, backend.run(q, k, v, enable_gqa=True))
            torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, enable_gqa=True), atol=2e-4,
                                       rtol=2e-4)
    assert [s[2] for s in made] == [18, 19, 24]  # set up once per shape, not per call


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])   # fp16: the TMA path (descriptors)
def test_a_runner_keeps_no_tensor_of_the_call_it_was_set_up_on_alive(dtype):
    import gc
    import weakref

    from autosdpa.backends import get
    for name, shape in (("triton_flash", (1, 2, 2, 8, 24, 16)), ("triton_decode", (1, 4, 2, 1, 40, 16))):
        q, k, v = make_qkv(*shape, device=DEV, dtype=dtype)
        gone = [weakref.ref(t) for t in (q, k, v)]
        run = get(name).runner(Call(q, k, v, enable_gqa=True))
        assert run != get(name).run
        del q, k, v
        gc.collect()
        assert all(ref() is None for ref in gone), name  # a cached plan must not pin a freed KV cache
