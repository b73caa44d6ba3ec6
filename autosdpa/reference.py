"""The reference every candidate is checked against: plain attention in float32/float64, chunked over
query rows so that checking a long sequence does not need the full score matrix at once."""
from __future__ import annotations

import math

import torch

from .backends.base import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, Call

# Normalised max error (max |out - ref| / max(1, max |ref|)) allowed per input dtype: a few ulps of the
# dtype times the error growth of a softmax-weighted sum; gradients get GRAD_FACTOR more.
TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
TF32_TOLERANCE = 2e-3  # fp32 on CUDA when TF32 matmuls are allowed
GRAD_FACTOR = 4.0


def tolerance(call: Call) -> float:
    dt = call.query.dtype
    if dt == torch.float32 and call.query.is_cuda and (
            torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32):
        return TF32_TOLERANCE
    return TOLERANCE.get(dt, 1e-2)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float64, torch.float32) else torch.float32


def broadcast_shape(a, b) -> tuple[int, ...] | None:
    """NumPy broadcasting of two shapes, None if they do not broadcast (torch.broadcast_shapes costs ~0.3 ms)."""
    a, b = tuple(a), tuple(b)
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    if any(x != y and x != 1 and y != 1 for x, y in zip(a, b)):
        return None
    return tuple(y if x == 1 else x for x, y in zip(a, b))


def check_shapes(call: Call) -> None:
    """Raise RuntimeError for q/k/v shapes no backend can run (what the reference itself would reject)."""
    q, k, v = call.query, call.key, call.value
    if k.shape[-2] != v.shape[-2] or q.shape[-1] != k.shape[-1]:
        raise RuntimeError(f"incompatible shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if q.dim() >= 4 and q.shape[-3] != k.shape[-3]:
        if not call.enable_gqa or q.shape[-3] % k.shape[-3]:
            raise RuntimeError("number of query heads must equal key/value heads (or be a multiple with enable_gqa)")


def reference_attention(call: Call, *, chunk_bytes: int = 256 << 20, dtype: torch.dtype | None = None,
                        rows: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v in ``dtype`` (default: float64 for fp32/64 inputs, else float32).

    ``rows``: (start, stop) ranges of query rows to compute (default: all); the output holds them in order.
    """
    check_shapes(call)
    q, k, v = call.query, call.key, call.value
    dt = dtype or compute_dtype(q.dtype)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    lq, lk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if q.dim() >= 4 and q.shape[-3] != k.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    scale = call.scale if call.scale is not None else 1.0 / math.sqrt(d)
    mask = call.dense_mask
    causal = call.causal
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=dt, device=q.device).masked_fill(~mask, -math.inf) \
            if mask.dtype == torch.bool else mask.to(dt)
    ranges = rows if rows is not None else [(0, lq)]
    n_rows = sum(b - a for a, b in ranges)
    lead = broadcast_shape(q.shape[:-1], v.shape[:-2] + (lq,))
    if lead is None:
        raise RuntimeError(f"batch shapes of q{tuple(q.shape)} and v{tuple(v.shape)} do not broadcast")
    out = torch.empty(*lead[:-1], n_rows, v.shape[-1], dtype=dt, device=q.device)
    rows_per_chunk = max(1, chunk_bytes // max(1, (q.numel() // max(lq, 1)) * lk * q.element_size()))
    offset = lk - lq if causal == CAUSAL_BOTTOM_RIGHT else 0
    at = 0
    for r0, r1 in ranges:
        for i0 in range(r0, r1, rows_per_chunk):
            i1 = min(r1, i0 + rows_per_chunk)
            s = torch.matmul(q[..., i0:i1, :], k.transpose(-2, -1)) * scale
            if bias is not None:
                b = bias if bias.shape[-2] == 1 else bias[..., i0:i1, :]
                s = s + b
            if causal != CAUSAL_NONE:
                i = torch.arange(i0, i1, device=q.device)[:, None]
                j = torch.arange(lk, device=q.device)[None, :]
                s = s.masked_fill(j > i + offset, -math.inf)
            p = torch.softmax(s, dim=-1)
            p = torch.nan_to_num(p, nan=0.0)  # fully masked rows give 0, as PyTorch's math backend does
            out[..., at:at + i1 - i0, :] = torch.matmul(p, v)
            at += i1 - i0
    return out


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Normalised max error over the positions where the reference is finite; inf if ``out`` is not."""
    if out.shape != ref.shape:
        return math.inf
    o, r = out.detach().to(ref.dtype), ref.detach()
    finite = torch.isfinite(r)
    if not bool(torch.isfinite(o[finite]).all()):
        return math.inf
    if not bool(finite.any()):
        return 0.0
    diff = (o[finite] - r[finite]).abs().max().item()
    return diff / max(1.0, r[finite].abs().max().item())
