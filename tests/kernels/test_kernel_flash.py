"""triton_flash kernel vs PyTorch's math backend (CPU: Triton interpreter; keep shapes tiny)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from autosdpa_kernels import flash  # noqa: E402

from kernel_ref import assert_close, make_qkv, pytorch_lowp, reference  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Lower right causal bias")]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _check(q, k, v, mask=None, causal="none", scale=None, gqa=False, grad=True, dtype=torch.float32):
    out = flash.attention(q, k, v, attn_mask=mask, causal=causal, scale=scale, enable_gqa=gqa)
    ref = reference(q, k, v, mask, causal, scale, gqa)
    # on a GPU, low-precision tiles really are low precision: PyTorch's own kernel bounds the error too
    base = pytorch_lowp(q, k, v, mask, causal, scale, gqa) if q.is_cuda and dtype != torch.float32 else None
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert_close(out, ref, dtype, base=base)
    if grad:
        do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(out.device)
        g = torch.autograd.grad(out, (q, k, v), do)
        gr = torch.autograd.grad(ref, (q, k, v), do.double())
        gb = torch.autograd.grad(base, (q, k, v), do) if base is not None else (None,) * 3
        for name, a, b, c in zip("qkv", g, gr, gb):
            assert a.shape == b.shape
            assert_close(a, b, dtype, grad=True, what=f"d{name}", base=c)


def test_the_bf16_tolerance_catches_a_one_percent_wrong_scale():
    """Issue 17: the old bound (scaled by max|ref|) passed a 1 %-wrong softmax scale in bf16. Rounding the
    exact output to bf16 passes the new one; the output of a 1 % larger scale does not."""
    q, k, v = make_qkv(1, 2, 2, 16, 24, 32, dtype=torch.bfloat16)
    ref = reference(q, k, v, causal="bottom_right")
    assert_close(ref.to(torch.bfloat16), ref, torch.bfloat16)
    wrong = reference(q, k, v, causal="bottom_right", scale=1.01 / 32 ** 0.5).to(torch.bfloat16)
    with pytest.raises(AssertionError, match="x the tolerance"):
        assert_close(wrong, ref, torch.bfloat16)


@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
@pytest.mark.parametrize("Lq,Lk", [(17, 33), (33, 17)])
def test_causal_ragged_fp32_grad(causal, Lq, Lk):
    q, k, v = make_qkv(1, 2, 2, Lq, Lk, 32, device=DEV, requires_grad=True)
    _check(q, k, v, causal=causal)


def test_fp16_causal_gqa_grad():
    q, k, v = make_qkv(2, 4, 2, 20, 40, 64, dtype=torch.float16, device=DEV, requires_grad=True)
    _check(q, k, v, causal="top_left", gqa=True, dtype=torch.float16)


def test_bf16_interpreter_upcast():
    q, k, v = make_qkv(1, 2, 2, 16, 24, 32, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    _check(q, k, v, causal="bottom_right", dtype=torch.bfloat16)


@pytest.mark.parametrize("kind", ["bool_b1lk", "bool_lk", "float_1h1k", "float_lk"])
def test_masks_broadcast_gqa_grad(kind):
    B, Hq, Hkv, Lq, Lk = 2, 4, 2, 17, 33
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, 32, device=DEV, requires_grad=True)
    g = torch.Generator().manual_seed(3)
    if kind == "bool_b1lk":
        mask = torch.rand(B, 1, Lq, Lk, generator=g) > 0.4
        mask[0, 0, 5] = False  # a fully-masked row: PyTorch's math backend returns 0 there
    elif kind == "bool_lk":
        mask = torch.rand(Lq, Lk, generator=g) > 0.4
    elif kind == "float_1h1k":
        mask = torch.randn(1, Hq, 1, Lk, generator=g)
        mask[..., :3] = float("-inf")
    else:
        mask = torch.randn(Lq, Lk, generator=g)
    _check(q, k, v, mask=mask.to(DEV), gqa=True)


def test_fully_masked_rows_are_zero():
    q, k, v = make_qkv(1, 1, 1, 16, 16, 16, device=DEV, requires_grad=True)
    mask = torch.ones(16, 16, dtype=torch.bool, device=DEV)
    mask[3] = False
    out = flash.attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[0, 0, 3], torch.zeros_like(out[0, 0, 3]))
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert torch.equal(dq[0, 0, 3], torch.zeros_like(dq[0, 0, 3]))


def test_mask_and_causal_together():
    # not reachable through F.sdpa (it rejects mask + is_causal), but the kernel composes them
    q, k, v = make_qkv(1, 2, 2, 24, 24, 32, device=DEV)
    mask = torch.randn(24, 24, device=DEV)
    out = flash.attention(q, k, v, attn_mask=mask, causal="top_left")
    tri = torch.ones(24, 24, dtype=torch.bool, device=DEV).tril()
    ref = reference(q, k, v, mask.masked_fill(~tri, float("-inf")))
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("D", [16, 64, 80, 128, 256])
def test_head_dims_fp16(D):
    grad = D in (16, 80)
    q, k, v = make_qkv(1, 2, 2, 16, 20, D, dtype=torch.float16, device=DEV, requires_grad=grad)
    _check(q, k, v, causal="bottom_right", grad=grad, dtype=torch.float16)


def test_value_head_dim_differs_grad():
    q, k, v = make_qkv(1, 2, 2, 17, 20, 48, Dv=24, device=DEV, requires_grad=True)
    _check(q, k, v, causal="top_left")


def test_noncontiguous_and_scale_grad():
    q, k, v = make_qkv(2, 2, 1, 19, 21, 32, device=DEV, requires_grad=True, layout="blhd")
    assert not q.is_contiguous()
    _check(q, k, v, scale=0.3, gqa=True)


def test_no_grad_path_and_lse():
    q, k, v = make_qkv(1, 2, 2, 17, 33, 32, device=DEV)
    with torch.no_grad():
        out = flash.attention(q, k, v, causal="top_left")
    o2, lse = flash.attention_with_lse(q, k, v, causal="top_left")
    assert torch.equal(out, o2)
    s = (q.double() @ k.double().transpose(-1, -2)) / 32 ** 0.5
    s = s.masked_fill(~torch.ones(17, 33, dtype=torch.bool, device=DEV).tril(), float("-inf"))
    assert torch.allclose(lse.double(), torch.logsumexp(s, -1), atol=1e-4)


def _reasons(q, k, v, **kw):
    args = dict(attn_mask=None, dropout_p=0.0, causal="none", enable_gqa=False, needs_grad=False)
    args.update(kw)
    return flash.not_supported_reasons(q, k, v, **args)


def test_not_supported_reasons(monkeypatch):
    q, k, v = make_qkv(1, 4, 2, 8, 8, 64, device=DEV)
    assert _reasons(q, q, q) == []
    assert _reasons(q, k, v, enable_gqa=True) == []
    assert any("enable_gqa" in r for r in _reasons(q, k, v))
    q3, _, v3 = make_qkv(1, 3, 2, 8, 8, 64, device=DEV)
    assert any("multiple" in r for r in _reasons(q3, k, v, enable_gqa=True))
    assert any("dropout" in r for r in _reasons(q, q, q, dropout_p=0.1))
    assert any("dtype" in r for r in _reasons(q.double(), q.double(), q.double()))
    assert any("4-D" in r for r in _reasons(q[0], q[0], q[0]))
    for d in (8, 20, 520):
        qd = torch.randn(1, 1, 4, d, device=DEV)
        assert any("head dim" in r for r in _reasons(qd, qd, qd)), d
    assert any("mask dtype" in r for r in _reasons(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.int32)))
    assert any("broadcast" in r for r in _reasons(q, q, q, attn_mask=torch.ones(3, 8, dtype=torch.bool)))
    assert any("causal" in r for r in _reasons(q, q, q, causal="diagonal"))
    with pytest.raises(ValueError, match="dropout|unsupported"):
        flash.attention(q.double(), q.double(), q.double())
    if DEV == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert any("CUDA" in r for r in _reasons(q, q, q))
    from autosdpa_kernels import _common
    monkeypatch.setattr(_common, "triton_available", lambda: False)
    assert "triton is not installed" in _reasons(q, q, q)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
def test_cuda_bf16_grad(causal):
    q, k, v = make_qkv(2, 8, 2, 300, 517, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    _check(q, k, v, causal=causal, gqa=True, dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 96, 256, 512])
def test_cuda_bf16_masked_head_dims(D):
    q, k, v = make_qkv(2, 4, 4, 200, 333, D, dtype=torch.bfloat16, device="cuda", requires_grad=D <= 256)
    mask = torch.rand(2, 1, 200, 333, device="cuda") > 0.3
    _check(q, k, v, mask=mask, grad=D <= 256, dtype=torch.bfloat16)
