"""Shared helpers for the Triton attention kernels.

Nothing here imports triton: the eligibility checks must work (and say "triton is not installed")
on machines without it, and importing the package must never launch or compile anything.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch

CAUSAL_KINDS = ("none", "top_left", "bottom_right")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 512

# Mask kinds as the kernels see them (constexpr).
MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def length_bucket(n: int) -> int:
    """Bucket a sequence length for autotune keys: next power of two, at least 16."""
    return max(16, next_pow2(n))


def head_dim_reason(d: int, what: str = "head dim") -> str | None:
    if d < MIN_HEAD_DIM or d > MAX_HEAD_DIM:
        return f"{what} {d} outside the supported range {MIN_HEAD_DIM}..{MAX_HEAD_DIM}"
    if d % 8 != 0:
        return f"{what} {d} is not a multiple of 8"
    return None


def device_reason(t: torch.Tensor, describe: bool = False) -> str | None:
    if t.device.type == "cuda" or (describe and t.device.type == "meta"):
        return None
    if interpreting() and t.device.type == "cpu":
        return None
    return (f"device {t.device.type} is not supported (needs CUDA, or CPU under TRITON_INTERPRET=1)")


def common_reasons(query, key, value, attn_mask, dropout_p, causal, enable_gqa, describe=False) -> list[str]:
    """Checks shared by every kernel in this package (``describe``: meta tensors pass, for launch plans)."""
    reasons: list[str] = []
    if not triton_available():
        reasons.append("triton is not installed")
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return reasons + ["query/key/value must be tensors"]
    if any(t.dim() != 4 for t in tensors):
        reasons.append("inputs must be 4-D (batch, heads, seq, dim); got "
                       f"{query.dim()}-D/{key.dim()}-D/{value.dim()}-D")
        return reasons
    r = device_reason(query, describe)
    if r:
        reasons.append(r)
    if not (query.device == key.device == value.device):
        reasons.append("query, key and value are on different devices")
    if query.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {query.dtype} not supported (float16, bfloat16, float32)")
    if not (query.dtype == key.dtype == value.dtype):
        reasons.append(f"mixed dtypes {query.dtype}/{key.dtype}/{value.dtype}")
    if dropout_p and dropout_p > 0.0:
        reasons.append("dropout_p > 0 is not supported")
    if causal not in CAUSAL_KINDS:
        reasons.append(f"unknown causal kind {causal!r}")
    B, Hq, Lq, D = query.shape
    Bk, Hkv, Lk, Dk = key.shape
    Bv, Hv, Lv, Dv = value.shape
    if Bk != B or Bv != B:
        reasons.append(f"batch sizes differ: {B}/{Bk}/{Bv}")
    if Hv != Hkv:
        reasons.append(f"key has {Hkv} heads but value has {Hv}")
    if Lv != Lk:
        reasons.append(f"key length {Lk} != value length {Lv}")
    if Dk != D:
        reasons.append(f"query head dim {D} != key head dim {Dk}")
    for d, what in ((D, "head dim"), (Dv, "value head dim")):
        r = head_dim_reason(d, what)
        if r:
            reasons.append(r)
    if Hkv != Hq:
        if not enable_gqa:
            reasons.append(f"query has {Hq} heads and key {Hkv}: needs enable_gqa=True")
        elif Hkv == 0 or Hq % Hkv != 0:
            reasons.append(f"query heads {Hq} not a multiple of key/value heads {Hkv}")
    if Lq == 0 or Lk == 0 or B == 0 or Hq == 0:
        reasons.append("empty input")
    reasons += _row_stride_reasons(tensors + ((attn_mask,) if isinstance(attn_mask, torch.Tensor) else ()))
    return reasons + _mask_reasons(attn_mask, query.device, (B, Hq, Lq, Lk))


def _mask_reasons(attn_mask, device, full) -> list[str]:
    if attn_mask is None:
        return []
    if not isinstance(attn_mask, torch.Tensor):
        return [f"attn_mask of type {type(attn_mask).__name__} not supported (pass a tensor)"]
    reasons = []
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"mask dtype {attn_mask.dtype} not supported (bool, float16, bfloat16 or float32)")
    if attn_mask.device != device:
        reasons.append("attn_mask is on another device")
    if attn_mask.dim() > 4:
        return reasons + [f"attn_mask has {attn_mask.dim()} dims (at most 4)"]
    try:
        ok = tuple(torch.broadcast_shapes(attn_mask.shape, full)) == full
    except RuntimeError:
        ok = False
    if not ok:
        reasons.append(f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to {full}")
    return reasons


#: Offsets inside a tile are 32-bit (block starts and batch/head offsets are 64-bit): a tile spans at most
#: MAX_TILE_ROWS rows, so a row stride below 2^31 / MAX_TILE_ROWS keeps them exact.
MAX_TILE_ROWS = 128


def _row_stride_reasons(tensors) -> list[str]:
    limit = 2**31 // MAX_TILE_ROWS
    big = [t.stride(-2) for t in tensors if t.dim() >= 2 and limit <= abs(t.stride(-2)) < 2**31]
    big += [t.stride(-1) for t in tensors[3:] if t.dim() >= 1 and limit <= abs(t.stride(-1)) < 2**31]
    return [f"row stride {big[0]} is too large for 32-bit offsets inside a tile (at most {limit - 1})"] if big else []


def prepare_mask(attn_mask, B, H, Lq, Lk):
    """Return (mask_tensor, kind, strides(4)) with stride 0 on broadcast dims; no copy."""
    if attn_mask is None:
        return None, MASK_NONE, (0, 0, 0, 0)
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(B, H, Lq, Lk)
    kind = MASK_BOOL if m.dtype == torch.bool else MASK_ADD
    return m, kind, tuple(m.stride())


def runner_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """For a runner set up on (q, k, v): a function that gives each later call's (q, k, v) as the kernels take
    them (the last dim copied to unit stride where these needed it), and raises ValueError once the user's TF32
    setting no longer gives the dot precision chosen now (a constexpr of the kernels set up)."""
    copy = tuple(last_dim_contiguous(t) is not t for t in (q, k, v))
    fp32, precision = q.dtype == torch.float32, dot_precision(q.dtype)

    def inputs(q, k, v):
        if fp32 and dot_precision(torch.float32) != precision:
            raise ValueError("the TF32 setting changed since this runner was made")
        if copy == (False, False, False):
            return q, k, v
        return tuple(t.contiguous() if c else t for t, c in zip((q, k, v), copy))
    return inputs


def mask_pointer(attn_mask: torch.Tensor) -> torch.Tensor:
    """What a kernel gets for a mask whose broadcast strides are already known: the mask itself (its
    unsqueezed and expanded views start at the same address), bool as uint8."""
    return attn_mask.view(torch.uint8) if attn_mask.dtype == torch.bool else attn_mask


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels assume unit stride on the last dim; copy only when that is not the case."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def default_scale(d: int, scale) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(d)


LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def tf32_allowed() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32)


def dot_precision(dtype) -> str:
    """tl.dot input precision: exact fp32 unless the user allowed TF32 matmuls (like torch); fp16/bf16 use the
    tensor-core default ("tf32" is the name Triton uses for its default, it does not change fp16/bf16 dots)."""
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ------------------------------------------------------------------------------------------------
# TMA (tensor descriptors): Hopper's copy engine loads a whole tile per instruction, zero-filling what lies out
# of bounds. What a descriptor cannot express (a misaligned base, strides that are not 16-byte multiples, a
# broadcast dim) and GPUs before Hopper take the pointer (cp.async) path.
# ------------------------------------------------------------------------------------------------
#: "0": never pass tensor descriptors (the pointer path everywhere; tests and A/B timings use it).
TMA_ENV = "AUTOSDPA_KERNEL_TMA"
_TMA_MAX_DIM = 2**31       # extents reach the kernel as i32 (the copy engine allows 2^32)
_TMA_MAX_STRIDE_BYTES = 2**40   # cuTensorMapEncodeTiled's limit on a stride


def tma_enabled() -> bool:
    return os.environ.get(TMA_ENV, "").strip() != "0"


@functools.lru_cache(maxsize=1)
def _has_tensor_descriptors() -> bool:
    if not triton_available():
        return False
    try:
        return importlib.util.find_spec("triton.tools.tensor_descriptor") is not None
    except ImportError:
        return False


@functools.lru_cache(maxsize=16)
def _hopper_or_newer(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def tma_device(device: torch.device) -> bool:
    """Kernels on this device may take tensor descriptors: CUDA compute capability 9 or newer, meta tensors
    (launch plans describe an H100), the CPU under the interpreter (which emulates them)."""
    if device.type == "cuda":
        ok = _hopper_or_newer(device)
    else:
        ok = device.type == "meta" or (device.type == "cpu" and interpreting())
    return ok and _has_tensor_descriptors()


def tma_tensor_ok(t: torch.Tensor) -> bool:
    """A descriptor can describe ``t`` as it is: 16-byte aligned base, unit last stride, every other stride a
    positive multiple of 16 bytes (no broadcast dims), extents and strides inside the copy engine's limits."""
    es = t.element_size()
    if t.stride(-1) != 1 or (t.device.type != "meta" and t.data_ptr() % 16):
        return False
    if any(n >= _TMA_MAX_DIM for n in t.shape):
        return False
    return all(s > 0 and (s * es) % 16 == 0 and s * es < _TMA_MAX_STRIDE_BYTES for s in t.stride()[:-1])


def use_tma(tensors, precision: str) -> bool:
    """Whether a launch may pass these (4-D) tensors as descriptors: tensor-core dots only (exact fp32 dots run
    on FMA units, which the copy engine does not help, and Triton then stages the tiles through local memory).
    The config tables have the last word (``configs.tma_offered``)."""
    return (precision != "ieee" and tma_enabled() and tma_device(tensors[0].device)
            and all(tma_tensor_ok(t) for t in tensors))

