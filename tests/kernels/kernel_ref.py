"""Reference helpers for the kernel tests (PyTorch's math backend, in float64)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}
GRAD_TOL = {torch.float32: (5e-4, 5e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 6e-2)}


def reference(q, k, v, mask=None, causal="none", scale=None, enable_gqa=False):
    """F.sdpa math backend in float64 (keeps the autograd graph to the inputs)."""
    qd, kd, vd = q.double(), k.double(), v.double()
    if causal == "bottom_right":
        assert mask is None
        mask = causal_lower_right(q.shape[2], k.shape[2])
    elif isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        mask = mask.double()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, is_causal=causal == "top_left",
                                                  scale=scale, enable_gqa=enable_gqa)


def make_qkv(B, Hq, Hkv, Lq, Lk, D, Dv=None, dtype=torch.float32, device="cpu", requires_grad=False,
             layout="bhld", seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D

    def mk(H, L, d):
        if layout == "blhd":  # (B, L, H, D) storage, viewed as (B, H, L, D): non-contiguous
            t = torch.randn(B, L, H, d, generator=g).to(dtype).transpose(1, 2)
        else:
            t = torch.randn(B, H, L, d, generator=g).to(dtype)
        t = t.to(device)
        return t.requires_grad_(requires_grad)

    return mk(Hq, Lq, D), mk(Hkv, Lk, D), mk(Hkv, Lk, Dv)


def assert_close(out, ref, dtype, grad=False, what="out"):
    atol, rtol = (GRAD_TOL if grad else TOL)[dtype]
    out = out.double()
    ref = ref.double()
    scale = max(1.0, ref.abs().max().item())
    err = (out - ref).abs().max().item()
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    assert err <= atol * scale + rtol * scale, f"{what}: max abs err {err:.3e} (scale {scale:.2f})"
