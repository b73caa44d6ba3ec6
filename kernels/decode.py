"""Split-KV ("flash-decoding") attention forward for few queries (Lq <= 16) against a long KV sequence.

Public API (4-D inputs, (batch, heads, seq, dim)); forward only:

    attention(q, k, v, attn_mask=None, causal="none", scale=None, enable_gqa=False, *, num_splits=None)
    not_supported_reasons(query, key, value, attn_mask=None, dropout_p=0.0, causal="none",
                          enable_gqa=False, needs_grad=False) -> list[str]

One program handles every query head of a KV group, so each K/V tile is loaded once per group.
"""
from __future__ import annotations

import importlib

import torch

from . import _common as C

__all__ = ["attention", "not_supported_reasons", "workspace_bytes", "MAX_LQ", "MAX_ROWS"]

MAX_LQ = 16          # queries per call
MAX_ROWS = 128       # (query heads per KV head) * Lq packed into one program
MAX_AUTO_SPLITS = 64  # the combine kernel holds (splits x Dv) fp32 in registers

def _kernels():
    """The Triton kernel module, imported on first launch (importing it imports triton)."""
    return importlib.import_module("._decode_kernels", __package__)


def not_supported_reasons(query, key, value, attn_mask=None, dropout_p=0.0, causal="none",
                          enable_gqa=False, needs_grad=False) -> list[str]:
    reasons = C.common_reasons(query, key, value, attn_mask, dropout_p, causal, enable_gqa)
    if needs_grad:
        reasons.append("triton_decode is forward-only (gradients requested)")
    if isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and query.dim() == 4 and key.dim() == 4:
        Hq, Lq = query.shape[1], query.shape[2]
        Hkv = key.shape[1]
        if Lq > MAX_LQ:
            reasons.append(f"Lq={Lq} is too long for the decode kernel (at most {MAX_LQ})")
        elif Hkv and Hq % Hkv == 0 and (Hq // Hkv) * Lq > MAX_ROWS:
            reasons.append(f"(Hq/Hkv)*Lq = {(Hq // Hkv) * Lq} rows per KV group exceeds {MAX_ROWS}")
    return reasons


def _num_splits(q, B, Hkv, Lk, granule):
    if q.device.type == "cuda":
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    else:
        sms = 4
    target = 2 * sms                       # ~2 waves of programs
    splits = max(1, min(C.cdiv(target, B * Hkv), C.cdiv(Lk, granule), MAX_AUTO_SPLITS))
    return splits


def _split_plan(q, B, Hkv, Lk, num_splits):
    K = _kernels()
    granule = K.INTERPRET_BLOCK_N if K.split_kernel is None else K.SPLIT_GRANULE
    if num_splits is None:
        num_splits = _num_splits(q, B, Hkv, Lk, granule)
    num_splits = max(1, int(num_splits))
    split_len = C.cdiv(C.cdiv(Lk, num_splits), granule) * granule
    return C.cdiv(Lk, split_len), split_len


def workspace_bytes(query, key, value, num_splits=None) -> int:
    B, Hq, Lq, _ = query.shape
    Hkv, Lk, Dv = key.shape[1], key.shape[2], value.shape[3]
    if num_splits is None:
        num_splits = max(1, min(C.cdiv(264, B * Hkv), C.cdiv(Lk, 128), MAX_AUTO_SPLITS))
    return B * Hq * Lq * num_splits * (max(16, C.next_pow2(Dv)) + 1) * 4


def attention(q, k, v, attn_mask=None, causal="none", scale=None, enable_gqa=False, *, num_splits=None):
    """Forward-only attention, same semantics as ``autosdpa_kernels.flash.attention``."""
    reasons = not_supported_reasons(q, k, v, attn_mask, 0.0, causal, enable_gqa, False)
    if reasons:
        raise ValueError("autosdpa_kernels.decode: unsupported call: " + "; ".join(reasons))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("autosdpa_kernels.decode is forward-only: call it under torch.no_grad() "
                           "(or use autosdpa_kernels.flash for gradients)")
    K = _kernels()
    q, k, v = (C.last_dim_contiguous(t) for t in (q, k, v))
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    sm_scale = C.default_scale(D, scale)
    mask, kind, mstr = C.prepare_mask(attn_mask, B, Hq, Lq, Lk)
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    interp = C.interpreting()
    precision = C.dot_precision(q.dtype)
    D_PAD, DV_PAD = max(16, C.next_pow2(D)), max(16, C.next_pow2(Dv))
    BLOCK_M = max(16, C.next_pow2(G * Lq))
    splits, split_len = _split_plan(q, B, Hkv, Lk, num_splits)

    po = torch.empty((B, Hq, Lq, splits, DV_PAD), device=q.device, dtype=torch.float32)
    plse = torch.empty((B, Hq, Lq, splits), device=q.device, dtype=torch.float32)
    o = torch.empty((B, Hq, Lq, Dv), device=q.device, dtype=q.dtype)
    off = (Lk - Lq) if causal == "bottom_right" else 0
    args = (q, k, v, mask if mask is not None else q, po, plse,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            *mstr,
            Hq, Hkv, G, Lq, Lk, off, sm_scale * C.LOG2E, split_len, splits, C.length_bucket(Lk))
    meta = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, D_PAD=D_PAD, DV_PAD=DV_PAD, MASK_KIND=kind,
                CAUSAL=causal != "none", PRECISION=precision, UPCAST=interp and q.dtype == torch.bfloat16,
                BLOCK_M=BLOCK_M)
    grid = (splits, B * Hkv)
    if K.split_kernel is None:
        K.decode_split_kernel[grid](*args, **meta, BLOCK_N=K.INTERPRET_BLOCK_N)
    else:
        K.split_kernel[grid](*args, **meta)
    s_pad = max(2, C.next_pow2(splits))
    K.decode_combine_kernel[(B * Hq * Lq,)](po, plse, o, o.stride(0), o.stride(1), o.stride(2), Hq, Lq, splits,
                                            HEAD_DIM_V=Dv, DV_PAD=DV_PAD, S_PAD=s_pad,
                                            num_warps=8 if s_pad * DV_PAD >= 16384 else 4)
    return o
