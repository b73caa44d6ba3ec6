"""Split-KV ("flash-decoding") attention forward for few queries (Lq <= 16) against a long KV sequence.

Public API (4-D inputs, (batch, heads, seq, dim)); forward only:

    attention(q, k, v, attn_mask=None, causal="none", scale=None, enable_gqa=False, *, num_splits=None)
    forward_runner(q, k, v, attn_mask=None, causal="none", enable_gqa=False, *, num_splits=None)
                                       -> run(q, k, v, attn_mask, scale)  # set up once per layout
    not_supported_reasons(query, key, value, attn_mask=None, dropout_p=0.0, causal="none",
                          enable_gqa=False, needs_grad=False) -> list[str]
    launches(q, k, v, attn_mask=None, causal="none", scale=None, enable_gqa=False, *, num_splits=None)
                                       -> list[Launch]   # what a call would launch, on meta tensors
    ready(q, k, v, attn_mask=None, causal="none", enable_gqa=False, needs_grad=False) -> bool

One program handles every query head of a KV group, so each K/V tile is loaded once per group.
"""
from __future__ import annotations

import importlib

import torch

from . import _common as C
from . import configs as CF
from . import launch as L

__all__ = ["attention", "forward_runner", "not_supported_reasons", "workspace_bytes", "launches", "ready",
           "split_plan", "MAX_LQ", "MAX_ROWS"]

MAX_LQ = 16          # queries per call
MAX_ROWS = 128       # (query heads per KV head) * Lq packed into one program
MAX_AUTO_SPLITS = 64  # the combine kernel holds (splits x Dv) fp32 in registers
SPLIT_GRANULE = 128   # split lengths are multiples of this (>= every BLOCK_N of the split configs)
META_SMS = 132        # SM count assumed for launch plans on meta tensors (H100 / H200)
#: runtime arguments of each kernel, in order
SPLIT_ARGS = ("Q", "K", "V", "Msk", "PO", "PLSE", "stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh",
              "stride_kn", "stride_vb", "stride_vh", "stride_vn", "stride_mb", "stride_mh", "stride_mm",
              "stride_mn", "HQ", "HKV", "G", "Lq", "Lk", "causal_off", "qk_scale", "split_len", "NUM_SPLITS",
              "K_BUCKET")
COMBINE_ARGS = ("PO", "PLSE", "O", "stride_ob", "stride_oh", "stride_om", "HQ", "Lq", "NUM_SPLITS")


def _kernels():
    """The Triton kernel module, imported on first launch (importing it imports triton)."""
    return importlib.import_module("._decode_kernels", __package__)


def not_supported_reasons(query, key, value, attn_mask=None, dropout_p=0.0, causal="none",
                          enable_gqa=False, needs_grad=False) -> list[str]:
    reasons = C.common_reasons(query, key, value, attn_mask, dropout_p, causal, enable_gqa)
    if needs_grad:
        reasons.append("triton_decode is forward-only (gradients requested)")
    reasons += _shape_reasons(query, key)
    if reasons or C.interpreting():
        return reasons
    return CF.config_reasons(("split",), query, key, value, attn_mask, L.smem_limit(query.device))


def _shape_reasons(query, key) -> list[str]:
    if not (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and query.dim() == key.dim() == 4):
        return []
    Hq, Lq, Hkv = query.shape[1], query.shape[2], key.shape[1]
    if Lq > MAX_LQ:
        return [f"Lq={Lq} is too long for the decode kernel (at most {MAX_LQ})"]
    if Hkv and Hq % Hkv == 0 and (Hq // Hkv) * Lq > MAX_ROWS:
        return [f"(Hq/Hkv)*Lq = {(Hq // Hkv) * Lq} rows per KV group exceeds {MAX_ROWS}"]
    return []


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return META_SMS if device.type == "meta" else 4


def _granule() -> int:
    return CF.INTERPRET["split"].block_n if C.interpreting() else SPLIT_GRANULE


def _num_splits(sms: int, B: int, Hkv: int, Lk: int, granule: int) -> int:
    """KV splits per (batch, KV head): about two waves of programs on the device, at most MAX_AUTO_SPLITS."""
    return max(1, min(C.cdiv(2 * sms, B * Hkv), C.cdiv(Lk, granule), MAX_AUTO_SPLITS))


def split_plan(device, B, Hkv, Lk, num_splits=None):
    """(splits, split_len) a call on ``device`` uses: ~2 waves of programs unless ``num_splits`` is given;
    split lengths are multiples of the granule, so no split is empty."""
    granule = _granule()
    if num_splits is None:
        num_splits = _num_splits(_sm_count(device), B, Hkv, Lk, granule)
    num_splits = max(1, int(num_splits))
    split_len = C.cdiv(C.cdiv(Lk, num_splits), granule) * granule
    return C.cdiv(Lk, split_len), split_len


def workspace_bytes(query, key, value, num_splits=None) -> int:
    """fp32 partial outputs and log-sum-exps, for the number of splits the call would use."""
    B, Hq, Lq, _ = query.shape
    Hkv, Lk, Dv = key.shape[1], key.shape[2], value.shape[3]
    splits, _ = split_plan(query.device, B, Hkv, Lk, num_splits)
    return B * Hq * Lq * splits * (max(16, C.next_pow2(Dv)) + 1) * 4


def _prepare(q, k, v, attn_mask, causal, scale, enable_gqa, describe=False):
    reasons = C.common_reasons(q, k, v, attn_mask, 0.0, causal, enable_gqa, describe=describe)
    reasons += _shape_reasons(q, k)
    if reasons:
        raise ValueError("autosdpa_kernels.decode: unsupported call: " + "; ".join(reasons))
    q, k, v = (C.last_dim_contiguous(t) for t in (q, k, v))
    B, Hq, Lq, D = q.shape
    mask, kind, mstr = C.prepare_mask(attn_mask, B, Hq, Lq, k.shape[2])
    if mask is not None:
        mask = C.mask_pointer(mask)
    return q, k, v, mask, kind, mstr, C.default_scale(D, scale)


def _launches(q, k, v, mask, kind, mstr, causal, sm_scale, num_splits, alloc):
    """(split launch, combine launch, output); ``alloc(shape, dtype)`` makes outputs and workspaces."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    D_PAD, DV_PAD = max(16, C.next_pow2(D)), max(16, C.next_pow2(Dv))
    splits, split_len = split_plan(q.device, B, Hkv, Lk, num_splits)
    po = alloc((B, Hq, Lq, splits, DV_PAD), torch.float32)
    plse = alloc((B, Hq, Lq, splits), torch.float32)
    o = alloc((B, Hq, Lq, Dv), q.dtype)
    args = dict(zip(SPLIT_ARGS, (q, k, v, mask if mask is not None else q, po, plse, *q.stride()[:3],
                                 *k.stride()[:3], *v.stride()[:3], *mstr, Hq, Hkv, G, Lq, Lk,
                                 (Lk - Lq) if causal == "bottom_right" else 0, sm_scale * C.LOG2E, split_len,
                                 splits, C.length_bucket(Lk))))
    meta = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, D_PAD=D_PAD, DV_PAD=DV_PAD, MASK_KIND=kind, CAUSAL=causal != "none",
                PRECISION=C.dot_precision(q.dtype), UPCAST=C.interpreting() and q.dtype == torch.bfloat16,
                BLOCK_M=max(16, C.next_pow2(G * Lq)))
    split = L.Launch("decode_split_kernel", "split", args, meta, splits, "", B * Hkv,
                     tune_key=("NUM_SPLITS", "K_BUCKET"))
    s_pad = max(2, C.next_pow2(splits))
    combine = L.Launch("decode_combine_kernel", None,
                       dict(zip(COMBINE_ARGS, (po, plse, o, *o.stride()[:3], Hq, Lq, splits))),
                       dict(HEAD_DIM_V=Dv, DV_PAD=DV_PAD, S_PAD=s_pad), B * Hq * Lq, "", 1,
                       fixed=CF.Cfg(None, None, 8 if s_pad * DV_PAD >= 16384 else 4, 1))
    return split, combine, o


def forward_runner(q, k, v, attn_mask=None, causal="none", enable_gqa=False, *, num_splits=None):
    """``attention`` set up once for inputs laid out like these (as ``flash.forward_runner``): returns
    ``run(q, k, v, attn_mask, scale) -> output``, which checks nothing and launches both kernels with the
    split plan and configs chosen here."""
    inputs = C.runner_inputs(q, k, v)
    q, k, v, mask, kind, mstr, _ = _prepare(q, k, v, attn_mask, causal, None, enable_gqa)
    dev, D, dtype = q.device, q.shape[3], q.dtype
    split, combine, o = _launches(q, k, v, mask, kind, mstr, causal, 1.0, num_splits,
                                  lambda shape, dt: torch.empty(shape, device=dev, dtype=dt))
    po_shape, plse_shape, o_shape = split.args["PO"].shape, split.args["PLSE"].shape, o.shape
    K = _kernels()
    go_split, go_combine = L.bind(split, K), L.bind(combine, K)

    def run(q, k, v, attn_mask, scale):
        q, k, v = inputs(q, k, v)
        po = torch.empty(po_shape, device=dev, dtype=torch.float32)
        plse = torch.empty(plse_shape, device=dev, dtype=torch.float32)
        o = torch.empty(o_shape, device=dev, dtype=dtype)
        go_split({"Q": q, "K": k, "V": v, "Msk": q if attn_mask is None else C.mask_pointer(attn_mask), "PO": po,
                  "PLSE": plse, "qk_scale": C.default_scale(D, scale) * C.LOG2E})
        go_combine({"PO": po, "PLSE": plse, "O": o})
        return o
    return run


def launches(q, k, v, attn_mask=None, causal="none", scale=None, enable_gqa=False, *, num_splits=None):
    """The two launches (split, combine) of one call, described without running anything (outputs and
    workspaces are meta tensors, so any size works; a grid CUDA cannot launch raises in ``Launch.grid``)."""
    q, k, v, mask, kind, mstr, sm_scale = _prepare(q, k, v, attn_mask, causal, scale, enable_gqa, describe=True)
    split, combine, _ = _launches(q, k, v, mask, kind, mstr, causal, sm_scale, num_splits,
                                  lambda shape, dtype: torch.empty(shape, device="meta", dtype=dtype))
    return [split, combine]


def ready(q, k, v, attn_mask=None, causal="none", enable_gqa=False, needs_grad=False) -> bool:
    """True when both kernels of this call were already compiled and autotuned for its key in this process
    (launching now neither compiles nor benchmarks). Always True under the interpreter; False on any doubt."""
    if C.interpreting():
        return True
    if needs_grad:
        return False
    try:
        return all(x.launched() for x in launches(q, k, v, attn_mask, causal, None, enable_gqa))
    except Exception:  # noqa: BLE001 - an unknown answer is "not ready": the caller falls back
        return False


def attention(q, k, v, attn_mask=None, causal="none", scale=None, enable_gqa=False, *, num_splits=None):
    """Forward-only attention, same semantics as ``autosdpa_kernels.flash.attention``."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("autosdpa_kernels.decode is forward-only: call it under torch.no_grad() "
                           "(or use autosdpa_kernels.flash for gradients)")
    q, k, v, mask, kind, mstr, sm_scale = _prepare(q, k, v, attn_mask, causal, scale, enable_gqa)
    split, combine, o = _launches(q, k, v, mask, kind, mstr, causal, sm_scale, num_splits,
                                  lambda shape, dtype: torch.empty(shape, device=q.device, dtype=dtype))
    K = _kernels()
    L.run(split, K)
    L.run(combine, K)
    return o
