"""Turning F.sdpa's arguments into a ``Call``, and sorting out the calls that must not decide anything."""
from __future__ import annotations

import math

import torch
from torch.nn.attention.bias import CausalBias

from . import nested
from .backends.base import Call
from .forms.structure import trusted_structure
from .masks import StructuredMask
from .problem import DTYPE_NAMES

_Tensor = torch.Tensor
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def needs_grad(query, key, value) -> bool:
    return torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)


def make_call(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
              grad: bool | None = None) -> Call | None:
    """A Call for inputs autosdpa handles; None sends the call straight to F.sdpa (which may reject it)."""
    if (not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool)
            or not isinstance(dropout_p, (float, int)) or isinstance(dropout_p, bool)
            or not (scale is None or isinstance(scale, (float, int)) and not isinstance(scale, bool))
            or not isinstance(query, torch.Tensor)
            or query.device.type not in ("cpu", "cuda") or query.dtype not in DTYPE_NAMES):
        return None
    if nested.any_jagged(query, key, value):
        return nested.make_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, grad)
    for t in (query, key, value):
        if type(t) not in _PLAIN or t.is_nested or t.layout != torch.strided or t.dim() < 3:
            return None
    lead = -2 if query.dim() == 3 else -3  # batch dims: (N, L, E) or (..., H, L, E)
    if not (query.dim() == key.dim() == value.dim() and query.shape[:lead] == key.shape[:lead] == value.shape[:lead]):
        return None  # broadcast batch dims: PyTorch's math backend takes them; the key does not describe them
    structure = None
    if attn_mask is None or type(attn_mask) is CausalBias:
        pass
    elif type(attn_mask) in _PLAIN:
        structure = trusted_structure(attn_mask)  # checked by the dispatcher on this call, if it was
    elif type(attn_mask) is StructuredMask:  # its structure said, not read: the dense mask for the backends
        structure, attn_mask = attn_mask.structure, attn_mask.materialize(query.device)
    else:
        return None
    grad = needs_grad(query, key, value) if grad is None else grad
    return Call(query, key, value, attn_mask, float(dropout_p), is_causal, scale, enable_gqa, bool(grad),
                structure)


def degenerate_reason(call: Call) -> str | None:
    """Why this call must not decide for its problem: PyTorch's backends may legitimately disagree on it (an
    empty tensor, a zero, negative or non-finite scale: torch 2.13's CPU flash kernel returns NaN for a causal
    call with a negative scale), so measuring it would poison the key for normal calls."""
    if nested.is_jagged_call(call):
        return nested.degenerate_reason(call)
    if any(n == 0 for t in (call.query, call.key, call.value) for n in t.shape):
        return "empty input"
    if invalid_reason(call):  # PyTorch's math error for these, whatever the scale: F.sdpa's CPU flash kernel
        return None           # would read past v when k and v lengths differ (a heap abort with gradients)
    if call.scale is not None and (call.scale <= 0 or not math.isfinite(call.scale)):
        return f"scale={call.scale}"
    if not 0.0 <= call.dropout_p < 1.0:
        return f"dropout_p={call.dropout_p}"
    return None


def invalid_reason(call: Call) -> str | None:
    """Shape errors PyTorch rejects (or, for k/v lengths on the CPU flash kernel, should reject)."""
    if nested.is_jagged_call(call):
        return None  # nested.make_call passes jagged calls with shape errors to F.sdpa itself
    q, k, v = call.query, call.key, call.value
    if k.shape[-2] != v.shape[-2]:
        return f"key length {k.shape[-2]} != value length {v.shape[-2]}"
    if q.shape[-1] != k.shape[-1]:
        return f"query head dim {q.shape[-1]} != key head dim {k.shape[-1]}"
    if q.dim() >= 4 and k.shape[-3] != v.shape[-3]:
        return "key and value have different numbers of heads"
    if q.dim() >= 4 and q.shape[-3] != k.shape[-3] and (not call.enable_gqa or q.shape[-3] % k.shape[-3]):
        return "query heads are not a multiple of key/value heads (or enable_gqa is off)"
    return None
