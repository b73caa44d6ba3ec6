"""Dense calls -- plain tensors (B..., H, L, E), maybe a mask, maybe one with a structure: their Call, problem,
bucket, reference, and synthetic inputs for offline tuning. ``forms`` picks this or ``jagged`` once per call."""
from __future__ import annotations

import math

import torch
from torch.nn.attention.bias import CausalBias, causal_lower_right

from ..backends.base import CAUSAL_BOTTOM_RIGHT, CAUSAL_TOP_LEFT, PADDED, Call
from ..backends.torch_backends import pytorch_choice  # noqa: F401  (this form's PyTorch pick)
from ..problem import DECODE_LQ, DTYPES, Problem, layout_class
from ..reference import max_error, reference_attention  # noqa: F401  (this form's max_error)
from .structure import Structure, StructuredMask, expected_mask, trusted_structure

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def needs_grad(query, key, value) -> bool:
    return torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)


def make_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, grad) -> Call | None:
    """The Call of dense inputs (``forms.make_call`` checked the plain arguments); None sends the call to
    F.sdpa, which runs or rejects it itself. A StructuredMask becomes the dense mask it stands for, with its
    structure said; a dense mask's structure is known only where the dispatcher checked it on this call."""
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


problem_of = Problem.from_call  # this form's problem key
reference = reference_attention  # and its reference


def _mask_bucket(m):
    if m.__class__ is CausalBias:
        return (m.variant, m.seq_len_q == m.seq_len_kv)
    if m.__class__ is StructuredMask:
        return (StructuredMask, m.structure.word, len(m.structure.lengths) > 1, m.mask_device)
    return (tuple(n == 1 for n in m.shape), m.dim(), m.dtype, m.__class__, m.requires_grad, m.device)


def bucket_key(fk: tuple, q, k, v, m, threshold: int | None):
    """The fast key with lengths and batch bucketed as the problem key buckets them, or None when the shapes
    are not plainly valid (those are decided per exact shape). Any plan is safe to share within a bucket:
    None is F.sdpa itself, and a Plan re-checks eligibility on each new layout."""
    # Every new length of a decode loop comes here, so the common 4-D case avoids slicing torch.Size and
    # calling helpers: ``problem.bucket`` and ``layout_class`` inlined (tests/test_bucket_key.py holds them equal).
    qs, ks, vs = fk[0], fk[1], fk[2]
    n = len(qs)
    if n < 3 or n != len(ks) or n != len(vs) or ks[-2] != vs[-2] or qs[-1] != ks[-1] or 0 in qs or 0 in ks:
        return None
    lq, lk = qs[-2], ks[-2]
    if n == 4:
        batch, heads = qs[0], (qs[1], ks[1], vs[1], qs[0] == ks[0] == vs[0])
    elif n == 3:
        batch, heads = qs[0], ()
    else:
        batch, heads = math.prod(qs[:-3]), (qs[-3], ks[-3], vs[-3], qs[:-3] == ks[:-3] == vs[:-3])
    if threshold is not None:
        if batch > threshold:
            batch = 1 << (batch - 1).bit_length()
        if lk > threshold or lq <= DECODE_LQ:  # decode-like query lengths bucket their keys from 1
            lk = 1 << (lk - 1).bit_length()
        if lq > threshold:
            lq = 1 << (lq - 1).bit_length()
    layout = "bhld" if n == 4 and q.is_contiguous() else layout_class(q)
    return ((n, batch, heads, lq, lk, qs[-1], vs[-1]), layout, None if m is None else _mask_bucket(m),
            fk[3], fk[4], *fk[6:])


def random_output(call: Call, seed: int = 0) -> torch.Tensor:
    """A float32 tensor shaped like the call's output: an upstream gradient for checking backward passes."""
    q, v = call.query, call.value
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*q.shape[:-1], v.shape[-1], generator=g).to(q.device)


def synthetic_call(p: Problem, device="cpu", seed: int = 0) -> Call:
    """Synthetic inputs of this dense problem's (bucketed) shape, for offline tuning; a structured problem's
    mask has its structure, with valid lengths of its ``fill``."""
    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = DTYPES[p.dtype]

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=dev, dtype=dt)

    if p.layout == "nd3":
        if p.hq != 1 or p.hkv != 1:
            raise ValueError("3-D (N, L, E) problems have one head")
        q, k, v = rand(p.batch, p.lq, p.d), rand(p.batch, p.lk, p.d), rand(p.batch, p.lk, p.dv)
    elif p.layout == "blhd":
        q = rand(p.batch, p.lq, p.hq, p.d).transpose(1, 2)
        k = rand(p.batch, p.lk, p.hkv, p.d).transpose(1, 2)
        v = rand(p.batch, p.lk, p.hkv, p.dv).transpose(1, 2)
    elif p.layout == "nd5+":  # all leading dims fold into the batch: (B, 1, H, L, D) keys the same
        q, k, v = (rand(p.batch, 1, p.hq, p.lq, p.d), rand(p.batch, 1, p.hkv, p.lk, p.d),
                   rand(p.batch, 1, p.hkv, p.lk, p.dv))
    else:
        q, k, v = (rand(p.batch, p.hq, p.lq, p.d), rand(p.batch, p.hkv, p.lk, p.d),
                   rand(p.batch, p.hkv, p.lk, p.dv))
        if p.layout == "strided":  # a non-contiguous view with unit last-dim stride
            q, k, v = (rand(p.batch, p.hq, p.lq, 2 * p.d)[..., : p.d],
                       rand(p.batch, p.hkv, p.lk, 2 * p.d)[..., : p.d],
                       rand(p.batch, p.hkv, p.lk, 2 * p.dv)[..., : p.dv])
    mask = structure = None
    is_causal = p.causal == CAUSAL_TOP_LEFT
    if p.causal == CAUSAL_BOTTOM_RIGHT:
        mask, is_causal = causal_lower_right(p.lq, p.lk), False
    elif p.mask != "none":
        kind, pattern = p.mask.split(":")
        full = dict(B=p.batch, H=p.hq, Q=p.lq, K=p.lk)
        shape = [full[c] if c != "1" else 1 for c in pattern]
        if p.layout == "nd3":
            shape = [shape[0], shape[2], shape[3]]
        elif p.layout == "nd5+":
            shape = [shape[0], 1, *shape[1:]]
        structure = synthetic_structure(p, shape[0]) if p.structure != "none" else None
        if structure is not None:
            mask = expected_mask(structure, tuple(shape), torch.bool if kind == "bool" else dt)
        elif kind == "bool":
            mask = torch.rand(*shape, generator=g) > 0.25
            mask[..., 0] = True  # no fully masked rows
        else:
            mask = torch.randn(*shape, generator=g).to(dt)
        mask = mask.to(dev)
    if p.train:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return Call(q, k, v, mask, 0.1 if p.dropout else 0.0, is_causal, None, p.gqa, p.train,
                structure=structure if p.mask != "none" else None)



def synthetic_structure(p: Problem, mask_batch: int) -> Structure:
    """This problem's mask structure with valid lengths of its ``fill``: the first sequence full (a batch
    is padded to its longest), the others alike, the share of valid keys in the middle of its quarter."""
    if p.structure not in PADDED:
        return Structure(p.structure, (), p.lq, p.lk)
    share = (p.fill - 0.5) / 4
    n = mask_batch
    if n == 1:
        lengths = (max(1, round(share * p.lk)),)
    else:
        rest = (share * n * p.lk - p.lk) / (n - 1)
        lengths = (p.lk, *[min(p.lk, max(0, round(rest)))] * (n - 1))
    return Structure(p.structure, lengths, p.lq, p.lk)
