"""FlashAttention-2 style attention in Triton: forward + backward (recompute), differentiable.

Public API (4-D inputs, (batch, heads, seq, dim)):

    attention(q, k, v, attn_mask=None, causal="none", scale=None, enable_gqa=False) -> Tensor
    forward_runner(q, k, v, attn_mask=None, causal="none", enable_gqa=False)
                                       -> run(q, k, v, attn_mask, scale)  # set up once per layout
    not_supported_reasons(query, key, value, attn_mask=None, dropout_p=0.0, causal="none",
                          enable_gqa=False, needs_grad=False) -> list[str]
    launches(q, k, v, attn_mask=None, causal="none", scale=None, enable_gqa=False, needs_grad=False)
                                       -> list[Launch]   # what a call would launch, on meta tensors
    ready(q, k, v, attn_mask=None, causal="none", enable_gqa=False, needs_grad=False) -> bool

Importing this module does not import triton; the kernels are compiled on first use.
"""
from __future__ import annotations

import importlib

import torch

from . import _common as C
from . import configs as CF
from . import launch as L

__all__ = ["attention", "attention_with_lse", "forward_runner", "not_supported_reasons", "workspace_bytes",
           "launches", "ready"]


def _kernels():
    """The Triton kernel module, imported on first launch (importing it imports triton)."""
    return importlib.import_module("._flash_kernels", __package__)


def not_supported_reasons(query, key, value, attn_mask=None, dropout_p=0.0, causal="none",
                          enable_gqa=False, needs_grad=False) -> list[str]:
    """Human-readable reasons why ``attention`` cannot run this call (empty list: eligible)."""
    reasons = C.common_reasons(query, key, value, attn_mask, dropout_p, causal, enable_gqa)
    if reasons or C.interpreting():
        return reasons
    kinds = ("fwd", "dkdv", "dq") if needs_grad else ("fwd",)
    return CF.config_reasons(kinds, query, key, value, attn_mask, L.smem_limit(query.device))


def workspace_bytes(query, key, value, needs_grad=False) -> int:
    """Extra memory beyond inputs and output: lse (fp32), plus delta and grads when training."""
    B, Hq, Lq, _ = query.shape
    n = B * Hq * Lq * 4
    if needs_grad:
        n *= 2
        n += query.numel() * query.element_size() + key.numel() * key.element_size() \
            + value.numel() * value.element_size()
    return n


def _launch_meta(q, D, Dv, mask_kind, causal):
    upcast = C.interpreting() and q.dtype == torch.bfloat16  # bf16 dots are wrong under the interpreter
    return dict(HEAD_DIM=D, HEAD_DIM_V=Dv, D_PAD=max(16, C.next_pow2(D)), DV_PAD=max(16, C.next_pow2(Dv)),
                MASK_KIND=mask_kind, CAUSAL=causal != "none", PRECISION=C.dot_precision(q.dtype), UPCAST=upcast)


def _causal_off(causal, Lq, Lk):
    return (Lk - Lq) if causal == "bottom_right" else 0


def _strides(t, n=3):
    return t.stride()[:n]


_STRIDES_QKVM = ("stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn", "stride_vb",
                 "stride_vh", "stride_vn", "stride_mb", "stride_mh", "stride_mm", "stride_mn")
#: runtime arguments of each kernel, in order (built on every launch: one zip, no per-name work)
FWD_ARGS = ("Q", "K", "V", "Msk", "O", "LSE", *_STRIDES_QKVM, "stride_ob", "stride_oh", "stride_om",
            "H", "G", "Lq", "Lk", "causal_off", "qk_scale", "Q_BUCKET", "K_BUCKET")
PRE_ARGS = ("O", "DO", "Delta", "stride_ob", "stride_oh", "stride_om", "stride_db", "stride_dh", "stride_dm",
            "H", "Lq")
_BWD_IN = ("Q", "K", "V", "Msk", "DO", "LSE", "Delta")
_BWD_TAIL = ("Lq", "Lk", "causal_off", "qk_scale", "sm_scale", "Q_BUCKET", "K_BUCKET")
DKDV_ARGS = (*_BWD_IN, "DK", "DV", *_STRIDES_QKVM, "stride_dob", "stride_doh", "stride_dom", "stride_dkb",
             "stride_dkh", "stride_dkn", "stride_dvb", "stride_dvh", "stride_dvn", "H", "HKV", "G", *_BWD_TAIL)
DQ_ARGS = (*_BWD_IN, "DQ", *_STRIDES_QKVM, "stride_dob", "stride_doh", "stride_dom", "stride_dqb", "stride_dqh",
           "stride_dqm", "H", "G", *_BWD_TAIL)
_BUCKETS = ("Q_BUCKET", "K_BUCKET")


def _fwd_launch(q, k, v, mask, mask_kind, mstr, causal, sm_scale, G, o, lse) -> L.Launch:
    B, Hq, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    args = dict(zip(FWD_ARGS, (q, k, v, mask if mask is not None else q, o, lse, *_strides(q), *_strides(k),
                               *_strides(v), *mstr, *_strides(o), Hq, G, Lq, Lk, _causal_off(causal, Lq, Lk),
                               sm_scale * C.LOG2E, C.length_bucket(Lq), C.length_bucket(Lk))))
    meta = _launch_meta(q, D, Dv, mask_kind, causal)
    pads = {"Q": meta["D_PAD"], "K": meta["D_PAD"], "V": meta["DV_PAD"], "O": meta["DV_PAD"]}
    tma = C.use_tma((q, k, v, o), meta["PRECISION"]) and CF.tma_offered(
        "fwd", meta["D_PAD"], meta["DV_PAD"], q.element_size(), meta["PRECISION"])
    # NEG_SCALE: the folded softmax scale needs a positive one (a negative scale takes the unfolded path)
    meta.update(NEG_SCALE=sm_scale < 0, TMA=tma)
    descs = tuple((name, rows, pads[name]) for name, rows in L.DESC_ROWS["fwd"]) if tma else ()
    return L.Launch("attn_fwd_kernel", "fwd", args, meta, Lq, "BLOCK_M", B * Hq, tune_key=_BUCKETS, descs=descs)


def _bwd_launches(do, q, k, v, o, lse, mask, mask_kind, mstr, causal, sm_scale, G, delta, dq, dk, dv):
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    meta = _launch_meta(q, D, Dv, mask_kind, causal)
    dv_pad = meta["DV_PAD"]
    # o and dO rows in fp32 registers: fewer rows and more warps for wide heads (no spills up to Dv=512)
    pre = L.Launch("bwd_preprocess_kernel", None,
                   dict(zip(PRE_ARGS, (o, do, delta, *_strides(o), *_strides(do), Hq, Lq))),
                   dict(HEAD_DIM_V=Dv, DV_PAD=dv_pad, BLOCK_M=max(16, min(PRE_BLOCK_M, 8192 // dv_pad))), Lq,
                   "BLOCK_M", B * Hq, fixed=CF.Cfg(None, None, 8 if dv_pad >= 256 else 4, 1))
    ins = (q, k, v, mask if mask is not None else q, do, lse, delta)
    strides = (*_strides(q), *_strides(k), *_strides(v), *mstr, *_strides(do))
    tail = (Lq, Lk, _causal_off(causal, Lq, Lk), sm_scale * C.LOG2E, sm_scale, C.length_bucket(Lq),
            C.length_bucket(Lk))
    dkdv = dict(zip(DKDV_ARGS, (*ins, dk, dv, *strides, *_strides(dk), *_strides(dv), Hq, Hkv, G, *tail)))
    dqa = dict(zip(DQ_ARGS, (*ins, dq, *strides, *_strides(dq), Hq, G, *tail)))
    return [pre,
            L.Launch("attn_bwd_dkdv_kernel", "dkdv", dkdv, meta, Lk, "BLOCK_N", B * Hkv, tune_key=_BUCKETS),
            L.Launch("attn_bwd_dq_kernel", "dq", dqa, meta, Lq, "BLOCK_M", B * Hq, tune_key=_BUCKETS)]


PRE_BLOCK_M = 64  # rows per program of the backward preprocess (fewer for Dv > 128)


def _empty(shape, like, dtype=None):
    return torch.empty(shape, device=like.device, dtype=dtype or like.dtype)


def _forward(q, k, v, mask, mask_kind, mstr, causal, sm_scale, G):
    B, Hq, Lq, _ = q.shape
    o = _empty((B, Hq, Lq, v.shape[3]), q)
    lse = _empty((B, Hq, Lq), q, torch.float32)
    L.run(_fwd_launch(q, k, v, mask, mask_kind, mstr, causal, sm_scale, G, o, lse), _kernels())
    return o, lse


def _backward(do, q, k, v, o, lse, mask, mask_kind, mstr, causal, sm_scale, G):
    K = _kernels()
    do = C.last_dim_contiguous(do)
    delta = _empty(lse.shape, lse)
    dq, dk, dv = _empty(q.shape, q), _empty(k.shape, k), _empty(v.shape, v)
    for launch in _bwd_launches(do, q, k, v, o, lse, mask, mask_kind, mstr, causal, sm_scale, G, delta, dq, dk, dv):
        L.run(launch, K)
    return dq, dk, dv


def launches(q, k, v, attn_mask=None, causal="none", scale=None, enable_gqa=False, needs_grad=False):
    """The launches one call makes (forward, then preprocess, dK/dV and dQ when ``needs_grad``), described
    without running anything: outputs and workspaces are meta tensors, so any size works. Raises
    ``ValueError`` for an unsupported call or a grid CUDA cannot launch (checked by ``Launch.grid``)."""
    q, k, v, mask, kind, mstr, sm_scale, G = _prepare(q, k, v, attn_mask, causal, scale, enable_gqa,
                                                      describe=True)
    B, Hq, Lq, _ = q.shape
    meta = torch.device("meta")
    o = torch.empty((B, Hq, Lq, v.shape[3]), device=meta, dtype=q.dtype)
    lse = torch.empty((B, Hq, Lq), device=meta, dtype=torch.float32)
    out = [_fwd_launch(q, k, v, mask, kind, mstr, causal, sm_scale, G, o, lse)]
    if needs_grad:
        do = torch.empty_like(o)
        grads = [torch.empty(t.shape, device=meta, dtype=t.dtype) for t in (q, k, v)]
        out += _bwd_launches(do, q, k, v, o, lse, mask, kind, mstr, causal, sm_scale, G, torch.empty_like(lse),
                             *grads)
    return out


def ready(q, k, v, attn_mask=None, causal="none", enable_gqa=False, needs_grad=False) -> bool:
    """True when every kernel this call launches was already compiled and autotuned for its key in this
    process, so launching now neither compiles nor benchmarks (safe during CUDA-graph capture). Always True
    under the interpreter; False on any doubt. The backward assumes a contiguous output gradient."""
    if C.interpreting():
        return True
    try:
        return all(x.launched() for x in launches(q, k, v, attn_mask, causal, None, enable_gqa, needs_grad))
    except Exception:  # noqa: BLE001 - an unknown answer is "not ready": the caller falls back
        return False


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


def _prepare(q, k, v, attn_mask, causal, scale, enable_gqa, describe=False):
    """Checked, kernel-ready inputs; ``describe``: meta tensors are fine (nothing will run)."""
    if causal not in C.CAUSAL_KINDS:
        raise ValueError(f"causal must be one of {C.CAUSAL_KINDS}, got {causal!r}")
    reasons = C.common_reasons(q, k, v, attn_mask, 0.0, causal, enable_gqa, describe=describe)
    if reasons:
        raise ValueError("autosdpa_kernels: unsupported call: " + "; ".join(reasons))
    q, k, v = (C.last_dim_contiguous(t) for t in (q, k, v))
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    mask, kind, mstr = C.prepare_mask(attn_mask, B, Hq, Lq, Lk)
    if mask is not None:
        mask = C.mask_pointer(mask)
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


def forward_runner(q, k, v, attn_mask=None, causal="none", enable_gqa=False):
    """``attention`` without gradients, set up once for inputs laid out like these (shapes, strides, dtypes,
    device, mask shape and strides): returns ``run(q, k, v, attn_mask, scale) -> output``, which checks
    nothing and launches with the config chosen here. The caller guarantees the layout (autosdpa's plans key
    their runners on it); ``run`` gives up (ValueError) if the user's TF32 setting changed since."""
    inputs = C.runner_inputs(q, k, v)
    q, k, v, mask, kind, mstr, _, G = _prepare(q, k, v, attn_mask, causal, None, enable_gqa)
    B, Hq, Lq, D = q.shape
    o_shape, lse_shape, dev, dtype = (B, Hq, Lq, v.shape[3]), (B, Hq, Lq), q.device, q.dtype
    launch = _fwd_launch(q, k, v, mask, kind, mstr, causal, 1.0, G, _empty(o_shape, q),
                         _empty(lse_shape, q, torch.float32))
    K = _kernels()
    go_pos, go_neg = L.bind_by_sign(launch, K)

    def run(q, k, v, attn_mask, scale):
        q, k, v = inputs(q, k, v)
        o = torch.empty(o_shape, device=dev, dtype=dtype)
        qk_scale = C.default_scale(D, scale) * C.LOG2E
        (go_neg if qk_scale < 0 else go_pos)({
            "Q": q, "K": k, "V": v, "Msk": q if attn_mask is None else C.mask_pointer(attn_mask), "O": o,
            "LSE": torch.empty(lse_shape, device=dev, dtype=torch.float32), "qk_scale": qk_scale})
        return o
    return run


def attention_with_lse(q, k, v, attn_mask=None, causal="none", scale=None, enable_gqa=False):
    """Forward only; also returns the natural-log log-sum-exp per row (B, Hq, Lq), +inf for empty rows."""
    q, k, v, mask, kind, mstr, sm_scale, G = _prepare(q, k, v, attn_mask, causal, scale, enable_gqa)
    o, lse = _forward(q, k, v, mask, kind, mstr, causal, sm_scale, G)
    return o, lse * C.LN2
