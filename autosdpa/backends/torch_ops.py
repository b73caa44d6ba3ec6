"""Run one of PyTorch's SDPA backends by calling its ATen op, after exactly what
``F.scaled_dot_product_attention`` does before that op (``attention.cpp``'s ``scaled_dot_product_attention``
and ``torch/nn/attention/bias.py``'s ``CausalBias._dispatch``; torch 2.13 on CPU, torch >= 2.5 on CUDA).
No process-wide state is read or written here, so ``run(name, ...)`` is what
``with sdpa_kernel(that backend): F.sdpa(...)`` computes, without the ``with``.

What F.sdpa does, in order, and where it is mirrored:
1. a ``CausalBias`` mask takes over (``__torch_function__``): upper-left (or square) becomes ``is_causal=True``;
   lower-right tries CUDA flash (``is_causal=True`` means lower-right to that kernel), then CUDA efficient
   attention's own lower-right variant, else F.sdpa on the materialised bool mask.  -> ``_run_causal_bias``
2. input validation (RuntimeError).                                               -> ``validate``
3. empty inputs return zeros without running any backend (recent PyTorch; the rule changed once). -> ``empty_call``
4. per backend: bool mask -> additive (cuDNN with its own fill value); CUDA flash pads the head dim to a
   multiple of 8 and slices the output back, with the scale of the unpadded head dim; efficient attention
   pads and expands the mask; math gets ``enable_gqa`` (it repeats k/v itself); the fused kernels take
   grouped k/v as they are.                                                -> ``_CPU``, ``_CUDA``
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, CausalVariant

from .torch_checks import cpu_flash_reasons, cpu_flash_safety_reasons

_sdpa = F.scaled_dot_product_attention  # PyTorch's, captured before autosdpa.patch() can replace it
_aten = torch.ops.aten
_NEG_INF = float("-inf")


def _version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


# F.sdpa converts a bool mask for cuDNN with a finite fill value, -65504 (``convert_boolean_attn_mask_cudnn``,
# since cuDNN took attn_bias in 2.5; still so in 2.10). PyTorch PR #177868 (March 2026) changed that constant;
# 2.11 is assumed to predate it and later versions to use -inf like the other backends. Unverified here (no
# GPU): tests/test_torch_backends.py's GPU test "mask_bool_empty_row" checks it on a device.
_CUDNN_BOOL_FILL = -65504.0 if _version() < (2, 12) else _NEG_INF


def run(name: str, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
        enable_gqa=False):
    """PyTorch backend ``name`` ("math", "flash", "efficient", "cudnn") on these inputs, as F.sdpa runs it."""
    if isinstance(attn_mask, CausalBias):
        return _run_causal_bias(name, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return _run_plain(name, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _run_plain(name, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    core = _checked_core(name, query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if core is None:
        return _empty_result(query, key, value)
    return core(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _checked_core(name, query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
    """The core of backend ``name`` for these inputs once F.sdpa's validation and the backend's guard passed
    (both raise where F.sdpa would), or None for empty inputs (F.sdpa returns zeros without a backend)."""
    validate(query, key, value, attn_mask)
    if empty_call(query, key, value):
        return None
    # (guard, core): the guard raises where F.sdpa would refuse the inputs for this backend; the core runs
    # them as F.sdpa runs them past that point
    pair = (_CUDA if query.is_cuda else _CPU if query.is_cpu else {}).get(name)
    if pair is None:
        raise RuntimeError(f"PyTorch has no {name} attention kernel for {query.device.type} tensors")
    guard, core = pair
    guard(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    return core


def runner_for(name: str, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
    """The core that ``run(name, ...)`` reaches for these inputs once every check has passed, or None when a
    check fails, the inputs are empty or the mask is a CausalBias (``run`` itself handles those).

    For callers that ask once per layout and then call the core for inputs of the same shapes, strides, dtypes
    and devices (``plans.Plan``): the checks depend on nothing else, so the core runs what ``run`` would."""
    if isinstance(attn_mask, CausalBias):
        return None
    try:
        return _checked_core(name, query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    except (RuntimeError, IndexError):
        return None


def validate(query, key, value, attn_mask) -> None:
    """F.sdpa's ``validate_sdpa_input``: same conditions, same exception type (RuntimeError)."""
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(f"Expected query, key, and value to have the same dtype, but got query.dtype: "
                           f"{query.dtype} key.dtype: {key.dtype} and value.dtype: {value.dtype} instead.")
    if not (query.device == key.device and query.device == value.device):
        raise RuntimeError(f"Expected query, key, and value to have the same device type, but got query.device: "
                           f"{query.device} key.device: {key.device} and value.device: {value.device} instead.")
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise RuntimeError(f"Expected query, key, and value to all be  at least 2 dimensional, but got query.dim: "
                           f"{query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead.")
    if attn_mask is not None:
        md = attn_mask.dtype
        if not (md == torch.bool or md == torch.float32 or md == query.dtype):
            raise RuntimeError(f"Expected attn_mask dtype to be bool or float or to match query dtype, but got "
                               f"attn_mask.dtype: {md} and  query.dtype: {query.dtype} instead.")
        if query.is_nested or key.is_nested:
            raise RuntimeError("Scaled_dot_product_attention: Nested tensors for query / key are not supported "
                               "when an explicit attn_mask is set")


# -- empty inputs -----------------------------------------------------------------------------------------------

_empty_rule: list[str] = []  # found once per process


def empty_rule() -> str:
    """Which early return for empty inputs this PyTorch's F.sdpa has, found by asking it once on tiny CPU
    tensors: "v_or_lq" (torch 2.13: value empty or Lq == 0; PR #184914), "any" (any of q, k, v empty; PR
    #175063, early 2026), or "none" (older: the backends run on empty tensors)."""
    if _empty_rule:
        return _empty_rule[0]

    def shortcut(q_shape, k_shape, v_shape) -> bool:
        with torch.inference_mode(False), torch.enable_grad():
            v = torch.zeros(v_shape, requires_grad=True)
            out = _sdpa(torch.zeros(q_shape), torch.zeros(k_shape), v)
            return type(out.grad_fn).__name__ == "AddBackward0"  # zeros + (q.sum() + k.sum() + v.sum()) * 0

    try:
        if not shortcut((1, 1, 0, 1), (1, 1, 1, 1), (1, 1, 1, 1)):
            rule = "none"
        else:
            rule = "any" if shortcut((1, 1, 1, 0), (1, 1, 1, 0), (1, 1, 1, 1)) else "v_or_lq"
    except Exception:  # F.sdpa refused the probe (flags leave no backend): no early return; ask again later
        return "none"
    _empty_rule.append(rule)
    return rule


def empty_call(query, key, value) -> bool:
    if query.shape[-2] and query.numel() and key.numel() and value.numel():
        return False
    rule = empty_rule()
    if rule == "v_or_lq":
        return value.numel() == 0 or query.shape[-2] == 0
    return rule == "any"


def _empty_result(query, key, value):
    shape = (*query.shape[:-1], value.shape[-1])
    out = torch.zeros(shape, dtype=query.dtype, device=query.device)
    # The sum()*0 keeps every input in the autograd graph, so their gradients are zeros, not None.
    return out + (query.sum() + key.sum() + value.sum()) * 0


# -- masks ------------------------------------------------------------------------------------------------------

def bool_to_additive(mask, dtype, fill: float = _NEG_INF):
    """F.sdpa's ``convert_boolean_attn_mask``: True (attend) -> 0, False -> ``fill``; other masks unchanged."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.where(mask.logical_not(), fill, torch.scalar_tensor(0.0, dtype=dtype, device=mask.device))


def lower_right_mask(bias: CausalBias, device):
    """The bool mask a lower-right CausalBias stands for (as ``CausalBias._materialize`` builds it)."""
    lq, lk = bias.seq_len_q, bias.seq_len_kv
    return torch.ones(lq, lk, device=device, dtype=torch.bool).tril(diagonal=lk - lq)


def _efficient_mask(mask, query, key):
    """F.sdpa's ``preprocess_mask`` for efficient attention: rows aligned to 8 elements (pad, then slice back
    so that only the memory is padded), expanded to (B, H, Lq, Lk)."""
    strides = mask.stride()
    if strides[-1] != 1 or any(s % 8 for s in strides[:-1]):
        n = mask.shape[-1]
        mask = F.pad(mask, (0, 8 - n % 8))[..., :n]
    return mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])


# -- the backends -----------------------------------------------------------------------------------------------

def _unguarded(q, k, v, mask, dropout_p, is_causal, enable_gqa) -> None:
    return None


def _math(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
    return torch._scaled_dot_product_attention_math(q, k, v, bool_to_additive(mask, q.dtype), dropout_p,
                                                    is_causal, None, scale=scale, enable_gqa=enable_gqa)[0]


def _guard_cpu_flash(q, k, v, mask, dropout_p, is_causal, enable_gqa) -> None:
    why = (cpu_flash_reasons(q, k, v, mask, dropout_p, enable_gqa, raise_like_pytorch=True)
           or cpu_flash_safety_reasons(q, k, v))
    if why:
        raise RuntimeError("No available kernel. Aborting execution. flash: " + "; ".join(why))


def _cpu_flash(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
    return torch._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                             attn_mask=bool_to_additive(mask, q.dtype),
                                                             scale=scale)[0]


def _guard_cuda(name, q, k, v, mask, is_causal, enable_gqa) -> None:
    """Inputs F.sdpa would refuse for this backend but its op would silently misread (on CUDA the full checks
    read the process-wide flags; the ops check the rest themselves and raise RuntimeError)."""
    why = None
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        why = "the fused kernels need 4-D query, key and value"
    elif name == "flash" and mask is not None:
        why = "flash attention takes no attn_mask"
    elif name == "flash" and is_causal and q.shape[-2] != k.shape[-2]:
        why = "flash attention's is_causal is lower-right aligned when Lq != Lk; F.sdpa does not use it there"
    elif not (q.shape[1] == k.shape[1] == v.shape[1]) and (not enable_gqa or name == "efficient"):
        why = f"{name} needs one number of heads for query, key and value here"
    elif k.shape[-2] != v.shape[-2]:
        why = "key and value have different sequence lengths"
    if why:
        raise RuntimeError(f"No available kernel. Aborting execution. {name}: {why}")


def _cuda_guard_of(name):
    def guard(q, k, v, mask, dropout_p, is_causal, enable_gqa) -> None:
        _guard_cuda(name, q, k, v, mask if name == "flash" else None, is_causal, enable_gqa)
    return guard


def _cuda_flash(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
    return _flash_padded(q, k, v, dropout_p, is_causal, scale)


def _flash_padded(q, k, v, dropout_p, is_causal, scale, pad_as_query=False):
    """F.sdpa's CUDA flash branch: head dims padded to a multiple of 8 (each its own; CausalBias pads all three
    by the query's padding), the scale of the unpadded head dim, the output sliced back."""
    d = q.shape[-1]
    og_scale = scale if scale is not None else 1.0 / math.sqrt(d)
    if pad_as_query:
        if d % 8:
            q, k, v = (F.pad(t, (0, 8 - d % 8)) for t in (q, k, v))
    else:
        q, k, v = (t if t.shape[-1] % 8 == 0 else F.pad(t, (0, 8 - t.shape[-1] % 8)) for t in (q, k, v))
    out = torch._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=og_scale)[0]
    return out if out.shape[-1] == d else out[..., :d]


def _needs_lse(q, k, v) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _cuda_efficient(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
    mask = bool_to_additive(mask, q.dtype)
    if mask is not None:
        mask = _efficient_mask(mask, q, k)
    return torch._scaled_dot_product_efficient_attention(q, k, v, mask, _needs_lse(q, k, v), dropout_p, is_causal,
                                                          scale=scale)[0]


def _cuda_cudnn(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
    mask = bool_to_additive(mask, q.dtype, _CUDNN_BOOL_FILL)
    return torch._scaled_dot_product_cudnn_attention(q, k, v, mask, _needs_lse(q, k, v), dropout_p, is_causal,
                                                      False, scale=scale)[0]


_CPU = {"math": (_unguarded, _math), "flash": (_guard_cpu_flash, _cpu_flash)}
_CUDA = {"math": (_unguarded, _math), "flash": (_cuda_guard_of("flash"), _cuda_flash),
         "efficient": (_cuda_guard_of("efficient"), _cuda_efficient), "cudnn": (_cuda_guard_of("cudnn"), _cuda_cudnn)}


# -- CausalBias -------------------------------------------------------------------------------------------------

def is_lower_right(bias: CausalBias) -> bool:
    """Whether CausalBias._dispatch takes its lower-right branch (else it is plain is_causal=True)."""
    return bias.variant == CausalVariant.LOWER_RIGHT and bias.seq_len_q != bias.seq_len_kv


def _run_causal_bias(name, query, key, value, bias, dropout_p, is_causal, scale, enable_gqa):
    if is_causal:
        raise ValueError("CausalBias should not be used with causal=True")
    if bias.seq_len_q == bias.seq_len_kv or bias.variant == CausalVariant.UPPER_LEFT:
        return _run_plain(name, query, key, value, None, dropout_p, True, scale, enable_gqa)
    if bias.variant != CausalVariant.LOWER_RIGHT:
        raise ValueError(f"CausalBias.variant must be a CausalVariant type, but found: {bias.variant}")
    validate_python(query, key, value)
    if query.device.type == "cuda" and name == "flash":
        _guard_cuda("flash", query, key, value, None, False, enable_gqa)
        # is_causal=True means lower-right to the flash kernel
        return _flash_padded(query, key, value, dropout_p, True, scale, pad_as_query=True)
    if query.device.type == "cuda" and name == "efficient":
        _guard_cuda("efficient", query, key, value, None, False, enable_gqa)
        return _efficient_lower_right(query, key, value, dropout_p, scale)
    mask = lower_right_mask(bias, query.device)
    return _run_plain(name, query, key, value, mask, dropout_p, False, scale, enable_gqa)


def validate_python(query, key, value) -> None:
    """``torch.nn.attention._utils._validate_sdpa_input``, which the lower-right branch runs (ValueError)."""
    if query.dtype != key.dtype or query.dtype != value.dtype:
        raise ValueError(f"Expected query, key, and value to have the same dtype, but got query.dtype: "
                         f"{query.dtype}, key.dtype: {key.dtype}, and value.dtype: {value.dtype} instead.")
    if query.device != key.device or query.device != value.device:
        raise ValueError(f"Expected query, key, and value to have the same device type, but got query.device: "
                         f"{query.device}, key.device: {key.device}, and value.device: {value.device} instead.")
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise ValueError(f"Expected query, key, and value to all be  at least 2 dimensional, but got query.dim: "
                         f"{query.dim()}, key.dim: {key.dim()} and value.dim: {value.dim()} instead.")


def _efficient_lower_right(q, k, v, dropout_p, scale):
    # custom_mask_type 2 = causal from bottom right (CausalVariant.LOWER_RIGHT); lse when any input needs grad,
    # as bias.py decides it (without looking at grad mode).
    lse = q.requires_grad or k.requires_grad or v.requires_grad
    out = _aten._efficient_attention_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None,
                                             None, None, None, dropout_p, int(CausalVariant.LOWER_RIGHT), lse,
                                             scale=scale, seqlen_k=None)[0]
    return out.transpose(1, 2)
