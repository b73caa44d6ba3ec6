"""NestedTensor (jagged layout) calls as tuned problems: their Call, their problem key, synthetic inputs for
offline tuning, and the per-sequence dense reference they are checked against.

Handled: query, key and value all jagged NJTs of shape (B, H, ragged L, E), ragged on dim 2 and without
holes, with no mask (PyTorch rejects masks for NJTs), key and value of equal lengths per sequence. Anything
else goes to F.sdpa untouched, which runs or rejects it as it always did. The backends are in
``backends/njt.py`` (the only ones whose ``forms`` include "jagged").
"""
from __future__ import annotations

import math

import torch

from ..backends.base import Call
from ..backends.njt import (NJT_PYTORCH, is_jagged, jagged_view, like_query, seqlen_range, token_count,
                            tokens_major)
from ..problem import DECODE_LQ, DTYPE_NAMES, DTYPES, Problem, bucket
from ..reference import max_error as dense_max_error, reference_attention

__all__ = ["is_jagged", "any_jagged", "make_call", "degenerate_reason", "invalid_reason", "pytorch_choice",
           "problem_of", "bucket_key", "synthetic_call", "reference", "max_error", "random_output"]


def any_jagged(*ts) -> bool:
    return any(is_jagged(t) for t in ts)


def _ragged_dims(t: torch.Tensor) -> list[int]:
    return [i for i, n in enumerate(t.shape) if not isinstance(n, int)]


def _same_lengths(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.offsets() is b.offsets() or a.shape[2] == b.shape[2]:  # shared offsets: the same ragged size
        return True
    return a.offsets().shape == b.offsets().shape and bool(torch.equal(a.offsets(), b.offsets().to(a.device)))


def _structure_ok(q, k, v, enable_gqa: bool) -> bool:
    for t in (q, k, v):
        if not is_jagged(t) or t.dim() != 4 or _ragged_dims(t) != [2] or t.lengths() is not None:
            return False
    if not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device):
        return False
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or q.shape[3] != k.shape[3] or k.shape[1] != v.shape[1]:
        return False
    if q.shape[1] != k.shape[1] and (not enable_gqa or k.shape[1] == 0 or q.shape[1] % k.shape[1]):
        return False
    return _same_lengths(k, v)


def make_call(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
              grad: bool | None = None) -> Call | None:
    """The Call for jagged NJT inputs (``forms.make_call`` has checked the plain arguments); None sends the
    call to F.sdpa, which runs or rejects it itself (masks, NJTs ragged elsewhere or with holes, mismatched
    shapes)."""
    if attn_mask is not None or not _structure_ok(query, key, value, enable_gqa):
        return None
    if grad is None:
        grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    return Call(query, key, value, None, float(dropout_p), is_causal, scale, enable_gqa, bool(grad))


def invalid_reason(call: Call) -> str | None:
    """None: ``make_call`` already passed jagged calls with shape errors to F.sdpa itself."""
    return None


def degenerate_reason(call: Call) -> str | None:
    """Why this jagged call must not decide for its problem (as ``dense.degenerate_reason`` for dense ones)."""
    q, k, v = call.query, call.key, call.value
    if any(t.shape[i] == 0 for t in (q, k, v) for i in (0, 1, 3)):
        return "empty input"
    if seqlen_range(q)[0] == 0 or seqlen_range(k)[0] == 0:
        return "a sequence of length 0"
    if call.scale is not None and (call.scale == 0 or not math.isfinite(call.scale)):
        return f"scale={call.scale}"
    if not 0.0 <= call.dropout_p < 1.0:
        return f"dropout_p={call.dropout_p}"
    return None


def pytorch_choice(call: Call) -> str | None:
    """What F.sdpa itself runs for this jagged call: PyTorch's NJT path when it takes the call, else None
    (F.sdpa raises for it, e.g. is_causal=True on the CPU)."""
    return None if NJT_PYTORCH.not_supported_reasons(call) else NJT_PYTORCH.name


def problem_of(call: Call, threshold: int | None = 16) -> Problem:
    """The problem key of a jagged call: batch, longest query and key sequences, total query tokens, bucketed."""
    q, k, v = call.query, call.key, call.value
    dtype = DTYPE_NAMES.get(q.dtype)
    if dtype is None or not is_jagged(call.query):
        raise ValueError(f"not a jagged call of a supported dtype ({q.dtype})")
    exact = Problem(dtype=dtype, batch=q.shape[0], hq=q.shape[1], hkv=k.shape[1], lq=seqlen_range(q)[1],
                    lk=seqlen_range(k)[1], d=q.shape[3], dv=v.shape[3], causal=call.causal, mask="none",
                    dropout=call.dropout_p > 0, gqa=bool(call.enable_gqa), train=call.needs_grad,
                    layout="jagged", deterministic=torch.are_deterministic_algorithms_enabled(),
                    tokens=token_count(q))
    return exact.bucketed(threshold).with_(tokens=bucket(exact.tokens, threshold))


def bucket_key(fk: tuple, q, k, v, m, threshold: int | None) -> tuple | None:
    """The dispatcher's bucket key for a jagged call (as it has one for dense calls), so that a new batch in a
    known bucket decides nothing: the fast key ``fk`` without its shapes (each new batch has new ragged
    sizes), plus batch, longest lengths and tokens bucketed as ``problem_of`` buckets them and the
    memory layout PyTorch's NJT path checks. None for anything ``make_call`` might not accept as it stands
    (those are decided per call); calls it rejects are never cached, and plans re-check each new layout."""
    if not (is_jagged(q) and is_jagged(k) and is_jagged(v)) or q.dim() != 4 or _ragged_dims(q) != [2]:
        return None
    if q.lengths() is not None or k.lengths() is not None:
        return None
    (q_lo, lq), (k_lo, lk) = seqlen_range(q), seqlen_range(k)
    if q_lo == 0 or k_lo == 0:
        return None
    t = threshold
    sizes = (bucket(q.shape[0], t), bucket(lq, t), bucket(lk, 0 if t is not None and lq <= DECODE_LQ else t),
             bucket(token_count(q), t), q.shape[1], k.shape[1], v.shape[1], q.shape[3], k.shape[3], v.shape[3])
    layouts = tuple(tuple(s if isinstance(s, int) else None for s in x.stride()) for x in (q, k, v))
    return ("jagged", sizes, layouts, *fk[3:])


def _fit(n: int, longest: int, total: int) -> tuple[int, int]:
    """(longest, total) that ``n`` sequences can have: the key's own values where they can, else values that
    bucket to them. Bucketing rounds the longest length and the total up to powers of two independently, so
    e.g. 3 sequences, longest 32, 32 tokens (from 20, 3, 9) become 30, 1, 1."""
    total = min(total, n * longest)  # fewer tokens when sequences of at most ``longest`` cannot hold them all
    if total < longest + n - 1 and longest > 1 and longest & (longest - 1) == 0:  # a rounded-up longest
        longest = max(longest // 2 + 1, total - n + 1)
    return longest, min(max(total, longest + n - 1), n * longest)


def _lengths(n: int, longest: int, total: int, g: torch.Generator) -> list[int]:
    """``n`` random lengths in [1, longest], the first ``longest``, summing to ``total`` (clamped to what
    is possible)."""
    total = min(max(total, longest + n - 1), n * longest)
    lens = [longest] + [1] * (n - 1)
    if n > 1:
        w = torch.rand(n - 1, generator=g)
        spare = total - longest - (n - 1)
        for i, x in enumerate((w / w.sum() * spare).floor().long().tolist()):
            lens[i + 1] += min(x, longest - 1)
        i = 1
        while sum(lens) < total:  # rounding and caps left a few tokens over: one more each, in turn
            if lens[i] < longest:
                lens[i] += 1
            i = i % (n - 1) + 1
    return lens


def _njt(lengths: list[int], heads: int, dim: int, offsets, rand) -> torch.Tensor:
    """(B, heads, ragged L, dim) over a (tokens, heads, dim) buffer: the layout of projected sequences."""
    return jagged_view(rand(sum(lengths), heads, dim), offsets, min(lengths), max(lengths)).transpose(1, 2)


def synthetic_call(problem: Problem, device="cpu", seed: int = 0) -> Call:
    """Jagged inputs of this problem's shape for offline tuning: ``batch`` sequences of random lengths, the
    longest ``lq`` (keys: ``lk``), ``tokens`` query tokens in all. Self-attention shapes (lq == lk) share
    the query's lengths, as projections of one sequence do."""
    if problem.layout != "jagged":
        raise ValueError(f"not a jagged problem: {problem.key}")
    dev, dt = torch.device(device), DTYPES[problem.dtype]
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=dev, dtype=dt)

    q_lens = _lengths(problem.batch, *_fit(problem.batch, problem.lq, problem.tokens), g)
    k_lens = q_lens if problem.lk == problem.lq else _lengths(
        problem.batch, problem.lk, round(sum(q_lens) * problem.lk / max(q_lens)), g)
    q_off = torch.tensor([0, *q_lens], device=dev).cumsum(0)
    k_off = q_off if k_lens is q_lens else torch.tensor([0, *k_lens], device=dev).cumsum(0)
    q = _njt(q_lens, problem.hq, problem.d, q_off, rand)
    k, v = _njt(k_lens, problem.hkv, problem.d, k_off, rand), _njt(k_lens, problem.hkv, problem.dv, k_off, rand)
    if problem.train:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return Call(q, k, v, None, 0.1 if problem.dropout else 0.0, problem.causal != "none", None, problem.gqa,
                problem.train)


def reference(call: Call, **kw) -> torch.Tensor:
    """Per-sequence dense ``reference_attention`` (float64 for fp32/64 inputs, else float32), as an NJT with
    the query's offsets. Differentiable in q, k and v. Raises RuntimeError for inputs it cannot describe."""
    q, k, v = call.query, call.key, call.value
    if not _structure_ok(q, k, v, call.enable_gqa) or call.dense_mask is not None:
        raise RuntimeError("jagged attention needs q, k, v NestedTensors (B, H, ragged L, E) ragged on dim 2, "
                           "no holes, no mask, equal key and value lengths")
    qo, ko = q.offsets().tolist(), k.offsets().tolist()
    qv, kv, vv = tokens_major(q), tokens_major(k), tokens_major(v)
    outs = []
    for b in range(len(qo) - 1):  # (1, H, L, E): 3-D inputs would have no head dim, hence no GQA
        q1, k1, v1 = (x[None, o[b]:o[b + 1]].transpose(1, 2) for x, o in ((qv, qo), (kv, ko), (vv, ko)))
        seq = Call(q1, k1, v1, None, 0.0, call.is_causal, call.scale, call.enable_gqa)
        outs.append(reference_attention(seq, **kw)[0].transpose(0, 1))
    return like_query(torch.cat(outs), q)


def max_error(out, ref) -> float:
    """``reference.max_error`` over the tokens of two NJTs; inf when ``out`` is not an NJT of ref's
    structure (layout, ragged dim, batch, per-sequence lengths, heads, head dim)."""
    if not (is_jagged(out) and is_jagged(ref)) or out.dim() != ref.dim() or _ragged_dims(out) != _ragged_dims(ref):
        return math.inf
    if out.lengths() is not None or ref.lengths() is not None:
        return math.inf
    if out.offsets() is not ref.offsets() and not (
            out.offsets().shape == ref.offsets().shape
            and torch.equal(out.offsets().cpu(), ref.offsets().cpu())):
        return math.inf
    return dense_max_error(out.values(), ref.values())


def random_output(call: Call, seed: int = 0) -> torch.Tensor:
    """A random float32 NJT shaped like the call's output (the query's offsets, v's head dim): an upstream
    gradient for checking backward passes."""
    q, v = call.query, call.value
    g = torch.Generator(device="cpu").manual_seed(seed)
    vals = torch.randn(token_count(q), q.shape[1], v.shape[3], generator=g).to(q.device)
    return like_query(vals, q)
