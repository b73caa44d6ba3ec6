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
SPLIT_GRANULE = 128   # split lengths are multiples of this (>= every BLOCK_N of the split configs)
MIN_SPLIT_BLOCKS = 4  # a split runs at least this many granules (tiles) of keys, or the whole sequence
META_SMS = 132        # SM count assumed for launch plans on meta tensors (H100 / H200)
COMBINE_CHUNK = 64    # output columns the fused combine holds per pass
#: runtime arguments of the kernel, in order
SPLIT_ARGS = ("Q", "K", "V", "Msk", "O", "PO", "PLSE", "Locks", "stride_qb", "stride_qh", "stride_qm", "stride_kb",
              "stride_kh", "stride_kn", "stride_vb", "stride_vh", "stride_vn", "stride_mb", "stride_mh", "stride_mm",
              "stride_mn", "stride_ob", "stride_oh", "stride_om", "HQ", "HKV", "G", "Lq", "Lk", "causal_off",
              "qk_scale", "split_len", "NUM_SPLITS", "K_BUCKET")


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
    """KV splits per (batch, KV head): one wave of programs on the device (B * Hkv * splits ~ SMs), but no split
    shorter than MIN_SPLIT_BLOCKS granules, so that each program's pipeline runs a few iterations."""
    return max(1, min(C.cdiv(sms, B * Hkv), Lk // (MIN_SPLIT_BLOCKS * granule)))


def split_plan(device, B, Hkv, Lk, num_splits=None):
    """(splits, split_len) a call on ``device`` uses: from the SM count and Lk unless ``num_splits`` is given;
    split lengths are multiples of the granule, so no split is empty."""
    granule = _granule()
    if num_splits is None:
        num_splits = _num_splits(_sm_count(device), B, Hkv, Lk, granule)
    num_splits = max(1, int(num_splits))
    split_len = C.cdiv(C.cdiv(Lk, num_splits), granule) * granule
    return C.cdiv(Lk, split_len), split_len


def workspace_bytes(query, key, value, num_splits=None) -> int:
    """fp32 partial outputs and log-sum-exps, for the number of splits the call would use (none for one)."""
    B, Hq, Lq, _ = query.shape
    Hkv, Lk, Dv = key.shape[1], key.shape[2], value.shape[3]
    splits, _ = split_plan(query.device, B, Hkv, Lk, num_splits)
    return 0 if splits == 1 else B * Hq * Lq * splits * (max(16, C.next_pow2(Dv)) + 1) * 4


#: arrival counters of the fused combine, per (device, stream): zero between launches (the last split of each
#: (batch, KV head) resets its counter), so they are zeroed once, when made; launches on one stream never
#: overlap, launches on two streams may, hence one buffer per stream.
_LOCKS: dict = {}


def _locks(device: torch.device, n: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    buf = _LOCKS.get((device, stream))
    if buf is None or buf.numel() < n:
        buf = _LOCKS[(device, stream)] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return buf


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


def _launches(q, k, v, mask, kind, mstr, causal, sm_scale, num_splits, alloc, counters=None):
    """(the launch, its output); ``alloc(shape, dtype)`` makes the output and workspaces, ``counters(device, n)``
    gives the arrival counters (default: this stream's, ``_locks``)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    D_PAD, DV_PAD = max(16, C.next_pow2(D)), max(16, C.next_pow2(Dv))
    splits, split_len = split_plan(q.device, B, Hkv, Lk, num_splits)
    o = alloc((B, Hq, Lq, Dv), q.dtype)
    if splits > 1:
        po, plse = alloc((B, Hq, Lq, splits, DV_PAD), torch.float32), alloc((B, Hq, Lq, splits), torch.float32)
        locks = (counters or _locks)(q.device, B * Hkv)
    else:   # one split writes the output: no partials, no counters
        po = plse = locks = o
    args = dict(zip(SPLIT_ARGS, (q, k, v, mask if mask is not None else q, o, po, plse, locks, *q.stride()[:3],
                                 *k.stride()[:3], *v.stride()[:3], *mstr, *o.stride()[:3], Hq, Hkv, G, Lq, Lk,
                                 (Lk - Lq) if causal == "bottom_right" else 0, sm_scale * C.LOG2E, split_len,
                                 splits, C.length_bucket(Lk))))
    precision, upcast, rows = C.dot_precision(q.dtype), C.interpreting() and q.dtype == torch.bfloat16, \
        max(16, C.next_pow2(G * Lq))
    tma = C.use_tma((k, v), precision) and CF.tma_offered("split", D_PAD, DV_PAD, q.element_size(), precision,
                                                          rows)
    meta = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, D_PAD=D_PAD, DV_PAD=DV_PAD, MASK_KIND=kind, CAUSAL=causal != "none",
                NEG_SCALE=sm_scale < 0, PRECISION=precision, UPCAST=upcast, TMA=tma, SPLIT=splits > 1,
                CHUNK=min(DV_PAD, COMBINE_CHUNK), BLOCK_M=rows)
    pads = {"K": D_PAD, "V": DV_PAD}
    descs = tuple((name, rows, pads[name]) for name, rows in L.DESC_ROWS["split"]) if tma else ()
    split = L.Launch("decode_split_kernel", "split", args, meta, splits, "", B * Hkv,
                     tune_key=("NUM_SPLITS", "K_BUCKET"), descs=descs)
    return split, o


def forward_runner(q, k, v, attn_mask=None, causal="none", enable_gqa=False, *, num_splits=None):
    """``attention`` set up once for inputs laid out like these (as ``flash.forward_runner``): returns
    ``run(q, k, v, attn_mask, scale) -> output``, which checks nothing and launches the kernel with the split
    plan and config chosen here."""
    inputs = C.runner_inputs(q, k, v)
    q, k, v, mask, kind, mstr, _ = _prepare(q, k, v, attn_mask, causal, None, enable_gqa)
    dev, D, dtype = q.device, q.shape[3], q.dtype
    split, o = _launches(q, k, v, mask, kind, mstr, causal, 1.0, num_splits,
                         lambda shape, dt: torch.empty(shape, device=dev, dtype=dt))
    po_shape, plse_shape, o_shape = split.args["PO"].shape, split.args["PLSE"].shape, o.shape
    parts, n_locks = split.meta["SPLIT"], q.shape[0] * k.shape[1]
    K = _kernels()
    go_pos, go_neg = L.bind_by_sign(split, K)

    def run(q, k, v, attn_mask, scale):
        q, k, v = inputs(q, k, v)
        o = torch.empty(o_shape, device=dev, dtype=dtype)
        if parts:
            po = torch.empty(po_shape, device=dev, dtype=torch.float32)
            plse = torch.empty(plse_shape, device=dev, dtype=torch.float32)
            locks = _locks(dev, n_locks)
        else:
            po = plse = locks = o
        qk_scale = C.default_scale(D, scale) * C.LOG2E
        (go_neg if qk_scale < 0 else go_pos)({
            "Q": q, "K": k, "V": v, "Msk": q if attn_mask is None else C.mask_pointer(attn_mask), "O": o, "PO": po,
            "PLSE": plse, "Locks": locks, "qk_scale": qk_scale})
        return o
    return run


def launches(q, k, v, attn_mask=None, causal="none", scale=None, enable_gqa=False, *, num_splits=None):
    """The launch of one call (a list of one: the split kernel combines the splits itself), described without
    running anything (output and workspaces are meta tensors, so any size works; a grid CUDA cannot launch
    raises in ``Launch.grid``)."""
    q, k, v, mask, kind, mstr, sm_scale = _prepare(q, k, v, attn_mask, causal, scale, enable_gqa, describe=True)
    split, _ = _launches(q, k, v, mask, kind, mstr, causal, sm_scale, num_splits,
                         lambda shape, dtype: torch.empty(shape, device="meta", dtype=dtype),
                         lambda device, n: torch.empty(n, device="meta", dtype=torch.int32))
    return [split]


def ready(q, k, v, attn_mask=None, causal="none", enable_gqa=False, needs_grad=False) -> bool:
    """True when the kernel of this call was already compiled and autotuned for its key in this process
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
    split, o = _launches(q, k, v, mask, kind, mstr, causal, sm_scale, num_splits,
                         lambda shape, dtype: torch.empty(shape, device=q.device, dtype=dtype))
    L.run(split, _kernels())
    return o
