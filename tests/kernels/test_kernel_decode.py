"""triton_decode (split-KV) kernel vs PyTorch's math backend (CPU: Triton interpreter)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from autosdpa_kernels import decode  # noqa: E402

from kernel_ref import assert_close, make_qkv, pytorch_lowp, reference  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _run(q, k, v, mask=None, causal="none", gqa=True, num_splits=None, dtype=torch.float32, scale=None):
    out = decode.attention(q, k, v, attn_mask=mask, causal=causal, enable_gqa=gqa, scale=scale,
                           num_splits=num_splits)
    ref = reference(q, k, v, mask, causal, scale, gqa)
    base = pytorch_lowp(q, k, v, mask, causal, scale, gqa) if q.is_cuda and dtype != torch.float32 else None
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert_close(out, ref, dtype, base=base)


@pytest.mark.parametrize("Lq", [1, 4])
@pytest.mark.parametrize("causal", ["none", "bottom_right"])
def test_decode_gqa_splits(Lq, causal):
    q, k, v = make_qkv(2, 8, 2, Lq, 200, 64, device=DEV)
    _run(q, k, v, causal=causal, num_splits=5)


def test_decode_default_splits_mha_fp16_scale():
    q, k, v = make_qkv(1, 2, 2, 1, 150, 32, dtype=torch.float16, device=DEV)
    _run(q, k, v, gqa=False, dtype=torch.float16, scale=0.2)


def test_decode_top_left_and_noncontiguous():
    q, k, v = make_qkv(1, 4, 1, 3, 97, 48, Dv=32, device=DEV, layout="blhd")
    _run(q, k, v, causal="top_left", num_splits=3)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_decode_masks(kind):
    B, Hq, Hkv, Lq, Lk = 2, 4, 2, 2, 130
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, 32, device=DEV)
    g = torch.Generator().manual_seed(5)
    if kind == "bool":
        mask = torch.rand(B, 1, Lq, Lk, generator=g) > 0.5
        mask[1, 0, 1] = False           # fully masked row -> 0, like PyTorch
        mask[0, 0, 0, 40:] = False      # whole splits empty for one row
    else:
        mask = torch.randn(1, Hq, 1, Lk, generator=g)
    _run(q, k, v, mask=mask.to(DEV), num_splits=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_last_split_combines_and_leaves_the_counters_at_zero(dtype):
    """Every split counts itself in its (batch, KV head) counter; the last to arrive combines and resets it, so
    the next launch (here: other split counts on the same counters) starts from zero."""
    q, k, v = make_qkv(3, 4, 2, 2, 130, 32, dtype=dtype, device=DEV)
    for splits in (9, 2, 5):
        (launch,) = decode.launches(q, k, v, enable_gqa=True, num_splits=splits)
        assert launch.meta["SPLIT"] and launch.args["NUM_SPLITS"] == splits
        assert launch.args["Locks"].is_meta                       # describing a call allocates nothing
        _run(q, k, v, num_splits=splits, dtype=dtype)
        locks = decode._locks(q.device, 3 * 2)                    # this stream's counters, as the launch used
        assert locks.dtype == torch.int32 and not locks.any()
    (launch,) = decode.launches(q, k, v, enable_gqa=True, num_splits=1)   # one split writes the output itself
    assert not launch.meta["SPLIT"] and launch.args["PO"] is launch.args["O"]
    _run(q, k, v, num_splits=1, dtype=dtype)


def test_decode_reasons():
    q, k, v = make_qkv(1, 8, 2, 4, 64, 64, device=DEV)
    r = decode.not_supported_reasons
    assert r(q, k, v, None, 0.0, "none", True, False) == []
    assert any("forward-only" in x for x in r(q, k, v, None, 0.0, "none", True, True))
    q32, _, _ = make_qkv(1, 8, 2, 32, 64, 64, device=DEV)
    assert any("too long" in x for x in r(q32, k, v, None, 0.0, "none", True, False))
    q2, _, _ = make_qkv(1, 128, 2, 4, 64, 64, device=DEV)
    assert any("rows per KV group" in x for x in r(q2, k, v, None, 0.0, "none", True, False))
    assert any("dropout" in x for x in r(q, k, v, None, 0.5, "none", True, False))
    qg = q.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="forward-only"):
        decode.attention(qg, k, v, enable_gqa=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("Lq,Lk,B", [(1, 8192, 1), (1, 33000, 4), (4, 5000, 2), (16, 4097, 1)])
def test_cuda_bf16_decode(Lq, Lk, B):
    q, k, v = make_qkv(B, 32, 8, Lq, Lk, 128, dtype=torch.bfloat16, device="cuda")
    _run(q, k, v, causal="bottom_right", dtype=torch.bfloat16)
    mask = torch.rand(B, 1, Lq, Lk, device="cuda") > 0.2
    _run(q, k, v, mask=mask, dtype=torch.bfloat16)
