"""Backends for NestedTensor (jagged layout) calls: PyTorch's own NJT attention and two compositions of dense
attention. Every call they take is (B, H, ragged L, E): ragged on dim 2, no holes (``lengths() is None``),
no mask (``forms.jagged.make_call`` keeps everything else away from them).

All three return what F.sdpa returns for NJT inputs: a jagged NestedTensor with the query's offsets (hence
its ragged size), built on a (tokens, H, Ev)-contiguous buffer and transposed to (B, H, ragged L, Ev).
Causal is top-left aligned per sequence, as dense ``is_causal``.
"""
from __future__ import annotations

import logging
import threading
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from .base import Backend, Call, register

try:  # the NJT class (an isinstance check is far cheaper than its is_nested / layout, each a torch function),
    # and the view F.sdpa builds its NJT output with (the public nested_tensor_from_jagged logs a deprecation
    # warning of torch.fx on first use)
    from torch.nested._internal.nested_tensor import NestedTensor as _NJT, nested_view_from_values_offsets_lengths
except ImportError:  # pragma: no cover - another PyTorch layout of its internals
    _NJT = nested_view_from_values_offsets_lengths = None

_sdpa = F.scaled_dot_product_attention  # the original: this module loads before autosdpa.patch() can run
_PYTORCH_LOG = "torch.nested._internal.sdpa"  # where PyTorch's NJT backend selection says why not
_LOG_LOCK = threading.Lock()  # one capture of that logger at a time


def is_jagged(t) -> bool:
    if _NJT is not None:
        return isinstance(t, _NJT)
    return isinstance(t, torch.Tensor) and t.is_nested and t.layout == torch.jagged


def token_count(nt: torch.Tensor) -> int:
    """Tokens of a (B, H, ragged L, E) NJT (its values are (H, tokens, E))."""
    return int(nt.values().shape[1])


def tokens_major(nt: torch.Tensor) -> torch.Tensor:
    """The (tokens, H, E) buffer behind a (B, H, ragged L, E) NJT (a view: gradients flow through it). Its
    values are (H, tokens, E): transposing those is a dense view, cheaper than an NJT transpose."""
    return nt.values().transpose(0, 1)


def seqlen_range(nt: torch.Tensor) -> tuple[int, int]:
    """(shortest, longest) sequence. PyTorch caches both on the NJT (its own kernels need them), so this syncs
    with the device at most once per batch."""
    return int(nt._get_min_seqlen()), int(nt._get_max_seqlen())


def like_query(values: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """(B, H, ragged L, Ev) NJT over ``values`` (tokens, H, Ev) with the query's offsets, as F.sdpa builds it."""
    return jagged_view(values, query.offsets(), *seqlen_range(query)).transpose(1, 2)


def jagged_view(values: torch.Tensor, offsets: torch.Tensor, shortest: int, longest: int) -> torch.Tensor:
    """(B, ragged L, ...) NJT over ``values`` (tokens, ...), differentiable in ``values``."""
    if nested_view_from_values_offsets_lengths is not None:
        return nested_view_from_values_offsets_lengths(values, offsets, None, min_seqlen=shortest,
                                                       max_seqlen=longest)
    return torch.nested.nested_tensor_from_jagged(values, offsets, min_seqlen=shortest, max_seqlen=longest)


class NJTBackend(Backend):
    """Common ground: jagged calls only; subclasses add their own reasons."""

    uses_kernels = False  # compositions of PyTorch ops

    takes_jagged = True  # dense backends lack it: eligibility keeps NJT calls away from them
    forms = frozenset({"jagged"})

    def not_supported_reasons(self, call: Call) -> list[str]:
        if not is_jagged(call.query):
            return ["takes only NestedTensor (jagged layout) inputs"]
        return self.jagged_reasons(call)

    def jagged_reasons(self, call: Call) -> list[str]:
        return []


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _pytorch_selection(call: Call) -> tuple[bool, list[str]]:
    """(whether PyTorch's NJT attention has a backend for this call, its reasons why not)."""
    try:
        from torch.nested._internal.sdpa import _select_sdp_backend
    except ImportError:  # another PyTorch: its documented limits (CPU: math only, which rejects causal)
        ok = call.query.is_cuda or not call.is_causal
        return ok, [] if ok else ["PyTorch's NestedTensor attention on the CPU does not take is_causal=True"]
    logger, handler = logging.getLogger(_PYTORCH_LOG), _Capture()
    with _LOG_LOCK:
        prev = logger.propagate
        logger.addHandler(handler)
        logger.propagate = False  # its reasons become ours instead of log warnings
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                choice = _select_sdp_backend(call.query, call.key, call.value, None, call.dropout_p,
                                             call.is_causal, call.enable_gqa)
        finally:
            logger.removeHandler(handler)
            logger.propagate = prev
    if choice != SDPBackend.ERROR:
        return True, []
    lines = [str(w.message).split(" (Triggered internally")[0] for w in caught] + handler.lines
    return False, [s.strip() for s in lines if s.strip() and not s.strip().endswith("because:")]


class NJTPyTorch(NJTBackend):
    """PyTorch's own NJT attention (F.sdpa on the NestedTensors): math on the CPU, flash / efficient / cuDNN
    on CUDA, whichever PyTorch's checks pick."""

    name = "njt_pytorch"

    def jagged_reasons(self, call: Call) -> list[str]:
        if call.query.shape[1] != call.key.shape[1]:
            return ["PyTorch's NestedTensor attention needs as many query heads as key/value heads (it "
                    "implements neither enable_gqa nor broadcast heads)"]
        ok, why = _pytorch_selection(call)
        return [] if ok else why or ["PyTorch's NestedTensor attention has no backend for these inputs"]

    def run(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False):
        return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


def _pad_rows(nt: torch.Tensor, longest: int) -> torch.Tensor:
    """For each token of ``nt``, its row in the padded (B * longest) layout."""
    offsets = nt.offsets()
    lengths = offsets.diff()
    first = torch.arange(lengths.numel(), device=offsets.device) * longest - offsets[:-1]
    n = token_count(nt)
    return torch.repeat_interleave(first, lengths, output_size=n) + torch.arange(n, device=offsets.device)


def _padded(nt: torch.Tensor, rows: torch.Tensor, longest: int) -> torch.Tensor:
    """Dense (B, H, longest, E), zeros past each sequence's end."""
    vals = tokens_major(nt)
    dense = vals.new_zeros(nt.shape[0] * longest, *vals.shape[1:]).index_copy(0, rows, vals)
    return dense.view(nt.shape[0], longest, *vals.shape[1:]).transpose(1, 2)


def _padding_mask(key, lq: int, lk: int, causal: bool) -> torch.Tensor:
    """(B, 1, 1 or Lq, Lk) bool: the keys of each sequence (and, if causal, those at or before the query)."""
    klen = key.offsets().diff()
    j = torch.arange(lk, device=klen.device)
    mask = (j[None, :] < klen[:, None])[:, None, None, :]
    if causal:  # top-left per sequence: query i sees keys j <= i
        i = torch.arange(lq, device=klen.device)
        mask = mask & (j[None, :] <= i[:, None])
    return mask


class NJTPadded(NJTBackend):
    """Pad to dense, one dense F.sdpa call with a key-padding mask (combined with causal), unpad."""

    name = "njt_padded"

    def run(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False):
        (_, lq), (k_lo, lk) = seqlen_range(query), seqlen_range(key)
        q_rows = _pad_rows(query, lq)
        k_rows = q_rows if key.offsets() is query.offsets() else _pad_rows(key, lk)
        q, k, v = _padded(query, q_rows, lq), _padded(key, k_rows, lk), _padded(value, k_rows, lk)
        mask = None
        if k_lo != lk:  # ragged keys: mask their padding. Padded query rows are dropped, and top-left causal
            mask, is_causal = _padding_mask(key, lq, lk, is_causal), False  # does not depend on query lengths
        out = _sdpa(q, k, v, mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)  # (B, H, Lq, Ev)
        heads, ev = out.shape[1], out.shape[3]
        return like_query(out.transpose(1, 2).reshape(-1, heads, ev).index_select(0, q_rows), query)

    def workspace_bytes(self, call: Call) -> int:
        q, k, v = call.query, call.key, call.value
        lq, lk = seqlen_range(q)[1], seqlen_range(k)[1]
        per = q.shape[0] * q.element_size()
        return per * (lq * q.shape[1] * (q.shape[3] + v.shape[3]) + lk * k.shape[1] * (k.shape[3] + v.shape[3])
                      + lq * lk * (1 + q.shape[1] * 2))


class NJTSplit(NJTBackend):
    """One dense F.sdpa call per group of sequences with equal (query, key) lengths, concatenated back."""

    name = "njt_split"

    def run(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False):
        qo, ko = query.offsets().tolist(), key.offsets().tolist()
        groups: dict[tuple[int, int], list[int]] = {}
        for b in range(len(qo) - 1):
            groups.setdefault((qo[b + 1] - qo[b], ko[b + 1] - ko[b]), []).append(b)
        qv, kv, vv = tokens_major(query), tokens_major(key), tokens_major(value)
        pieces: list = [None] * (len(qo) - 1)
        for members in groups.values():
            def batch(vals, o):  # (G, H, L, E) of this group's sequences
                return torch.stack([vals[o[b]:o[b + 1]] for b in members]).transpose(1, 2)
            out = _sdpa(batch(qv, qo), batch(kv, ko), batch(vv, ko), None, dropout_p, is_causal, scale=scale,
                        enable_gqa=enable_gqa).transpose(1, 2)
            for i, b in enumerate(members):
                pieces[b] = out[i]
        return like_query(torch.cat(pieces), query)


NJT_PYTORCH = register(NJTPyTorch())
NJT_PADDED = register(NJTPadded())
NJT_SPLIT = register(NJTSplit())
