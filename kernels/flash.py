"""FlashAttention-2 style attention in Triton: forward + backward (recompute), differentiable.

Public API (4-D inputs, (batch, heads, seq, dim)):

    attention(q, k, v, attn_mask=None, causal="none", scale=None, enable_gqa=False) -> Tensor
    not_supported_reasons(query, key, value, attn_mask=None, dropout_p=0.0, causal="none",
                          enable_gqa=False, needs_grad=False) -> list[str]

Importing this module does not import triton; the kernels are compiled on first use.
"""
from __future__ import annotations

import importlib

import torch

from . import _common as C

__all__ = ["attention", "not_supported_reasons", "workspace_bytes"]

def _kernels():
    """The Triton kernel module, imported on first launch (importing it imports triton)."""
    return importlib.import_module("._flash_kernels", __package__)


def not_supported_reasons(query, key, value, attn_mask=None, dropout_p=0.0, causal="none",
                          enable_gqa=False, needs_grad=False) -> list[str]:
    """Human-readable reasons why ``attention`` cannot run this call (empty list: eligible)."""
    return C.common_reasons(query, key, value, attn_mask, dropout_p, causal, enable_gqa)


def workspace_bytes(query, key, value, needs_grad=False) -> int:
    """Extra memory beyond inputs and output: lse (fp32), plus delta and grads when training."""
    B, Hq, Lq, _ = query.shape
    n = B * Hq * Lq * 4
    if needs_grad:
        n *= 2
        n += query.numel() * query.element_size() + key.numel() * key.element_size() \
            + value.numel() * value.element_size()
    return n


def _launch_meta(q, D, Dv, mask_kind, causal, Lq, Lk):
    interp = C.interpreting()
    upcast = interp and q.dtype == torch.bfloat16
    precision = C.dot_precision(q.dtype)
    return dict(HEAD_DIM=D, HEAD_DIM_V=Dv, D_PAD=max(16, C.next_pow2(D)), DV_PAD=max(16, C.next_pow2(Dv)),
                MASK_KIND=mask_kind, CAUSAL=causal != "none", PRECISION=precision, UPCAST=upcast)


def _causal_off(causal, Lq, Lk):
    return (Lk - Lq) if causal == "bottom_right" else 0


def _forward(q, k, v, mask, mask_kind, mstr, causal, sm_scale, G):
    K = _kernels()
    B, Hq, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    o = torch.empty((B, Hq, Lq, Dv), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, Lq), device=q.device, dtype=torch.float32)
    meta = _launch_meta(q, D, Dv, mask_kind, causal, Lq, Lk)
    m_arg = mask if mask is not None else q  # dummy pointer when there is no mask
    args = (q, k, v, m_arg, o, lse,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            *mstr,
            o.stride(0), o.stride(1), o.stride(2),
            Hq, G, Lq, Lk, _causal_off(causal, Lq, Lk), sm_scale * C.LOG2E,
            C.length_bucket(Lq), C.length_bucket(Lk))
    if K.fwd is None:  # interpreter: fixed config
        cfg = K.INTERPRET_FWD
        grid = (triton_cdiv(Lq, cfg["BLOCK_M"]), B * Hq)
        K.attn_fwd_kernel[grid](*args, **meta, **cfg)
    else:
        grid = lambda META: (triton_cdiv(Lq, META["BLOCK_M"]), B * Hq)  # noqa: E731
        K.fwd[grid](*args, **meta)
    return o, lse


def _backward(do, q, k, v, o, lse, mask, mask_kind, mstr, causal, sm_scale, G):
    K = _kernels()
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    do = C.last_dim_contiguous(do)
    meta = _launch_meta(q, D, Dv, mask_kind, causal, Lq, Lk)
    delta = torch.empty((B, Hq, Lq), device=q.device, dtype=torch.float32)
    PRE_M = 64
    K.bwd_preprocess_kernel[(triton_cdiv(Lq, PRE_M), B * Hq)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        Hq, Lq, HEAD_DIM_V=Dv, DV_PAD=meta["DV_PAD"], BLOCK_M=PRE_M)
    dq = torch.empty((B, Hq, Lq, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, Hkv, Lk, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, Hkv, Lk, Dv), device=q.device, dtype=v.dtype)
    m_arg = mask if mask is not None else q
    off = _causal_off(causal, Lq, Lk)
    qk_scale = sm_scale * C.LOG2E
    qb, kb = C.length_bucket(Lq), C.length_bucket(Lk)
    common_in = (q.stride(0), q.stride(1), q.stride(2),
                 k.stride(0), k.stride(1), k.stride(2),
                 v.stride(0), v.stride(1), v.stride(2),
                 *mstr,
                 do.stride(0), do.stride(1), do.stride(2))
    dkdv_args = (q, k, v, m_arg, do, lse, delta, dk, dv, *common_in,
                 dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
                 Hq, Hkv, G, Lq, Lk, off, qk_scale, sm_scale, qb, kb)
    dq_args = (q, k, v, m_arg, do, lse, delta, dq, *common_in,
               dq.stride(0), dq.stride(1), dq.stride(2),
               Hq, G, Lq, Lk, off, qk_scale, sm_scale, qb, kb)
    if K.bwd_dkdv is None:
        cfg = K.INTERPRET_BWD
        K.attn_bwd_dkdv_kernel[(triton_cdiv(Lk, cfg["BLOCK_N"]), B * Hkv)](*dkdv_args, **meta, **cfg)
        K.attn_bwd_dq_kernel[(triton_cdiv(Lq, cfg["BLOCK_M"]), B * Hq)](*dq_args, **meta, **cfg)
    else:
        K.bwd_dkdv[lambda M: (triton_cdiv(Lk, M["BLOCK_N"]), B * Hkv)](*dkdv_args, **meta)
        K.bwd_dq[lambda M: (triton_cdiv(Lq, M["BLOCK_M"]), B * Hq)](*dq_args, **meta)
    return dq, dk, dv


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


class _FlashAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, mask_kind, mstr, causal, sm_scale, G):
        o, lse = _forward(q, k, v, mask, mask_kind, mstr, causal, sm_scale, G)
        ctx.save_for_backward(q, k, v, o, lse, *( (mask,) if mask is not None else ()))
        ctx.meta = (mask is not None, mask_kind, mstr, causal, sm_scale, G)
        return o

    @staticmethod
    def backward(ctx, do):
        has_mask, mask_kind, mstr, causal, sm_scale, G = ctx.meta
        saved = ctx.saved_tensors
        q, k, v, o, lse = saved[:5]
        mask = saved[5] if has_mask else None
        dq, dk, dv = _backward(do, q, k, v, o, lse, mask, mask_kind, mstr, causal, sm_scale, G)
        return dq, dk, dv, None, None, None, None, None, None


def _prepare(q, k, v, attn_mask, causal, scale, enable_gqa):
    if causal not in C.CAUSAL_KINDS:
        raise ValueError(f"causal must be one of {C.CAUSAL_KINDS}, got {causal!r}")
    reasons = C.common_reasons(q, k, v, attn_mask, 0.0, causal, enable_gqa)
    if reasons:
        raise ValueError("autosdpa_kernels: unsupported call: " + "; ".join(reasons))
    q, k, v = (C.last_dim_contiguous(t) for t in (q, k, v))
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    mask, kind, mstr = C.prepare_mask(attn_mask, B, Hq, Lq, Lk)
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    return q, k, v, mask, kind, mstr, C.default_scale(D, scale), Hq // Hkv


def attention(q, k, v, attn_mask=None, causal="none", scale=None, enable_gqa=False):
    """Scaled dot-product attention with the semantics of ``F.scaled_dot_product_attention``.

    ``causal``: "none", "top_left" (``is_causal=True``) or "bottom_right" (``CausalBias`` LOWER_RIGHT).
    ``attn_mask``: bool (True = attend) or additive float, broadcastable to (B, Hq, Lq, Lk); no grad.
    Rows with nothing to attend produce 0 (like PyTorch's math backend) and get zero gradients.
    """
    q, k, v, mask, kind, mstr, sm_scale, G = _prepare(q, k, v, attn_mask, causal, scale, enable_gqa)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FlashAttnFn.apply(q, k, v, mask, kind, mstr, causal, sm_scale, G)
    o, _ = _forward(q, k, v, mask, kind, mstr, causal, sm_scale, G)
    return o


def attention_with_lse(q, k, v, attn_mask=None, causal="none", scale=None, enable_gqa=False):
    """Forward only; also returns the natural-log log-sum-exp per row (B, Hq, Lq), +inf for empty rows."""
    q, k, v, mask, kind, mstr, sm_scale, G = _prepare(q, k, v, attn_mask, causal, scale, enable_gqa)
    o, lse = _forward(q, k, v, mask, kind, mstr, causal, sm_scale, G)
    return o, lse * C.LN2
