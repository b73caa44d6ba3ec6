"""Rewrites: a call whose mask has a structure (``structure``), run as an equivalent cheaper
call of F.sdpa. They are candidates like any backend: eligible only for the structures they rewrite, checked
against the reference on first sight and timed, so a rewrite wins only where it measurably does.

=============  ==================  =================================================  ======================
backend        structures          the call it makes                                  difference to F.sdpa
=============  ==================  =================================================  ======================
mask_none      all                 no mask                                            bit-identical
mask_causal    causal, causal_br   ``is_causal=True`` / ``causal_lower_right``        bit-identical
mask_split     padded kinds        one call per sequence, its padding cut away        <= 1 ulp
mask_trim      padded kinds        one call, keys (and fully masked query rows) cut   <= 1 ulp
                                   to the longest sequence; no mask if all are equal
=============  ==================  =================================================  ======================

Query rows with no valid key (left padding, empty sequences) get exactly what F.sdpa returns for a fully masked
row on that device and dtype, asked of F.sdpa itself once (0 on the CPU with torch 2.13). Each rewrite calls
F.sdpa, so the rewritten call runs on PyTorch's own pick for it, grouped-query attention included (a mask is what
keeps PyTorch's CPU flash kernel from taking ``enable_gqa``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ..backends.base import Backend, Call, register
from .structure import PADDED, Structure, detect, trusted_structure

_sdpa = F.scaled_dot_product_attention  # PyTorch's own, captured before autosdpa.patch() can replace it
_masked_values: dict = {}


def structure_of(mask, q, k) -> Structure | None:
    """The structure of ``mask`` on this call: the one trusted for it (``forms.structure.trusted``), else
    read from its values (and checked on all of them)."""
    s = trusted_structure(mask)
    return s if s is not None else detect(mask, q, k)


def masked_value(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What F.sdpa returns for a query row with no valid key, on this device and dtype (asked once)."""
    key = (q.device, q.dtype)
    val = _masked_values.get(key)
    if val is None:
        z = torch.zeros(1, 1, 1, 8, device=q.device, dtype=q.dtype)
        none = torch.zeros(1, 1, 1, 1, device=q.device, dtype=torch.bool)
        with torch.no_grad():
            val = _masked_values[key] = _sdpa(z, z, z, attn_mask=none)[0, 0, 0, 0].clone()
    return val.to(v.dtype)


def _filled(q, v, rows: int) -> torch.Tensor:
    """(1, H, rows, Dv) of the fully masked row value."""
    return masked_value(q, v).expand(1, q.shape[1], rows, v.shape[-1])


class Rewrite(Backend):
    """Base of the rewrites: eligible for the structures in ``words`` (4-D calls, no dropout: a rewrite would
    draw other random numbers than F.sdpa)."""

    uses_kernels = False
    forms = frozenset({"structured"})
    rewrite = True  # the dispatcher hands rewrites the call's structure (and only they take one)
    words: tuple[str, ...] = ()
    tolerance: str = ""  # how far from F.sdpa on the dense mask it may be: "bit-identical" or "<= 1 ulp"
    does: str = ""       # the call it makes, for explain

    def not_supported_reasons(self, call: Call) -> list[str]:
        s = call.structure
        if s is None:
            return ["the mask has no structure this rewrite uses"]
        if s.word not in self.words:
            return [f"rewrites {', '.join(self.words)} masks, not {s.word}"]
        q = call.query
        if q.dim() != 4 or call.key.dim() != 4:
            return ["needs 4-D (B, H, L, E) inputs"]
        if call.dropout_p:
            return ["dropout: a rewritten call would draw other random numbers than F.sdpa"]
        if call.is_causal:
            return ["is_causal together with a mask"]
        return []

    def run(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False):
        s = structure_of(attn_mask, query, key)
        if s is None or s.word not in self.words or dropout_p or is_causal:
            raise RuntimeError(f"{self.name}: this call's mask is not one it rewrites")
        return self.apply(s, query, key, value, attn_mask, scale, enable_gqa)

    def apply(self, s: Structure, q, k, v, mask, scale, gqa) -> torch.Tensor:
        raise NotImplementedError


class MaskNone(Rewrite):
    name = "mask_none"
    words = ("all",)
    tolerance = "bit-identical"
    does = "the call without its mask"

    def apply(self, s, q, k, v, mask, scale, gqa):
        return _sdpa(q, k, v, scale=scale, enable_gqa=gqa)


class MaskCausal(Rewrite):
    name = "mask_causal"
    words = ("causal", "causal_br")
    tolerance = "bit-identical"
    does = "is_causal=True (bottom-right: causal_lower_right)"

    def apply(self, s, q, k, v, mask, scale, gqa):
        if s.word == "causal":
            return _sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return _sdpa(q, k, v, attn_mask=causal_lower_right(s.lq, s.lk), scale=scale, enable_gqa=gqa)


def _sequence(s: Structure, b: int, q, k, v, scale, gqa) -> torch.Tensor:
    """Batch entry ``b`` of a padded call, with its padding cut away: (1, H, Lq, Dv)."""
    lo, hi = s.key_range(b)
    if hi == lo:
        return _filled(q, v, q.shape[2])
    return _uniform(s.word, lo, q[b:b + 1], k[b:b + 1, :, lo:hi], v[b:b + 1, :, lo:hi], scale, gqa)


class MaskSplit(Rewrite):
    name = "mask_split"
    words = PADDED
    tolerance = "<= 1 ulp"
    does = "one call per sequence, its padding cut away"

    def apply(self, s, q, k, v, mask, scale, gqa):
        if len(s.lengths) == 1:  # one length for every sequence: one call does it
            return MASK_TRIM.apply(s, q, k, v, mask, scale, gqa)
        return torch.cat([_sequence(s, b, q, k, v, scale, gqa) for b in range(q.shape[0])], dim=0)


class MaskTrim(Rewrite):
    name = "mask_trim"
    words = PADDED
    tolerance = "<= 1 ulp"
    does = "one call with the keys cut to the longest sequence"

    def apply(self, s, q, k, v, mask, scale, gqa):
        longest = max(s.lengths)
        if longest == 0:
            return _filled(q, v, q.shape[2]).expand(q.shape[0], -1, -1, -1).clone()
        lk = s.lk
        lo, hi = (0, longest) if s.word.endswith("_r") else (lk - longest, lk)
        if len(set(s.lengths)) == 1:  # every sequence alike: no mask left
            return _uniform(s.word, lo, q, k[:, :, lo:hi], v[:, :, lo:hi], scale, gqa)
        dense = mask.materialize(q.device) if hasattr(mask, "materialize") else mask
        m = dense[..., lo:hi]
        if s.word != "cpad_l" or lo == 0:
            return _sdpa(q, k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=m, scale=scale, enable_gqa=gqa)
        # cpad_l: query rows before ``lo`` have no valid key in any sequence
        rows = m[..., lo:, :] if m.shape[-2] > 1 else m
        out = _sdpa(q[:, :, lo:], k[:, :, lo:], v[:, :, lo:], attn_mask=rows, scale=scale, enable_gqa=gqa)
        head = _filled(q, v, lo).expand(q.shape[0], -1, -1, -1)
        return torch.cat([head, out], dim=2)


def _uniform(word: str, lo: int, q, k, v, scale, gqa) -> torch.Tensor:
    """Sequences that all have the same valid keys, from ``lo`` (k and v already cut to them): one call, no
    mask."""
    if word in ("kpad_r", "kpad_l"):
        return _sdpa(q, k, v, scale=scale, enable_gqa=gqa)
    if word == "cpad_r":  # top-left causal over the valid keys; rows past them see all of them
        return _sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    # cpad_l: rows before the first valid key see none; the rest are a causal call of their own
    out = _sdpa(q[:, :, lo:], k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if lo == 0:
        return out
    return torch.cat([_filled(q, v, lo).expand(q.shape[0], -1, -1, -1), out], dim=2)


MASK_NONE = register(MaskNone())
MASK_CAUSAL = register(MaskCausal())
MASK_SPLIT = register(MaskSplit())
MASK_TRIM = register(MaskTrim())
