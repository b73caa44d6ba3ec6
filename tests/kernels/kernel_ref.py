"""Reference helpers for the kernel tests (PyTorch's math backend, in float64)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

# Element by element, |out - ref| <= rtol * |ref| + atol * rms(ref): relative where values are large, absolute
# at the typical magnitude (the RMS, not the largest value) where they cross 0. On the CPU the kernels compute in
# fp32 (bf16 tiles are upcast under the interpreter), so bf16 errors are the output's own rounding (2^-9
# relative) and these bounds are a few rounding units; a 1 %-wrong softmax scale moves outputs by far more.
# (The old bound, (atol + rtol) * max|ref|, let exactly that pass in bf16.)
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2**-7, 2**-7)}
GRAD_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2**-6, 2**-6)}
#: GPU tests compare with PyTorch's own kernel in the same dtype (``base``): at most this many times its error
BASE_FACTOR = 2.0


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


def pytorch_lowp(q, k, v, mask=None, causal="none", scale=None, enable_gqa=False):
    """F.sdpa in the inputs' own dtype (PyTorch's pick of kernel): on a GPU, the error a low-precision kernel
    may have (``assert_close(..., base=)``); keeps the autograd graph to the inputs."""
    if causal == "bottom_right":
        mask = causal_lower_right(q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal == "top_left", scale=scale,
                                          enable_gqa=enable_gqa)


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


def error_ratio(out, ref, dtype, grad=False) -> float:
    """The largest |out - ref| / (rtol * |ref| + atol * rms(ref)): at most 1 passes."""
    atol, rtol = (GRAD_TOL if grad else TOL)[dtype]
    out, ref = out.double(), ref.double()
    rms = ref.pow(2).mean().sqrt().clamp_min(1e-6)
    return ((out - ref).abs() / (rtol * ref.abs() + atol * rms)).max().item()


def assert_close(out, ref, dtype, grad=False, what="out", base=None):
    """``out`` matches the float64 ``ref`` within ``TOL`` (``GRAD_TOL``), element by element; with ``base`` (the
    same quantity from PyTorch's own kernel in ``dtype``, on a GPU where tiles really are low precision): the
    largest error may also be up to ``BASE_FACTOR`` times ``base``'s."""
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    ratio = error_ratio(out, ref, dtype, grad)
    if ratio <= 1.0:
        return
    err = (out.double() - ref.double()).abs().max().item()
    if base is not None:
        allowed = BASE_FACTOR * (base.double() - ref.double()).abs().max().item()
        assert err <= allowed, f"{what}: max abs err {err:.3e}, more than {BASE_FACTOR} x PyTorch's ({allowed:.3e})"
        return
    raise AssertionError(f"{what}: error {ratio:.2f} x the tolerance (max abs err {err:.3e})")
