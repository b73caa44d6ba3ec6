"""Mask objects that say what they are: structure from provenance, never from values.

Reading a CUDA mask's values needs a host sync, breaks CUDA-graph capture and is invisible to graph replay, so on
CUDA (and while compiling or capturing anywhere) autosdpa never reads them. A model that *builds* its mask knows
its structure; these objects carry it, in the style of PyTorch's ``CausalBias``:

    from autosdpa.masks import key_padding
    mask = key_padding(lengths=[2048, 1229, 819, 512], lq=2048, lk=2048, causal=True)   # HF right padding
    out = autosdpa.sdpa(q, k, v, attn_mask=mask)        # the fastest equivalent path, no sync per layer
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)   # exactly the dense mask it stands for

Passed to plain F.sdpa an object behaves exactly like the dense bool mask it stands for (``materialize()``,
built once per object and device, so a model that hands one object to every layer builds it once). Passed to
autosdpa it routes to the rewrites that its structure allows (``autosdpa.forms.rewrites``), checked and timed
like any backend.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .forms.structure import PADDED, Structure, StructuredMask

__all__ = ["StructuredMask", "key_padding"]


def key_padding(lengths: Sequence[int] | torch.Tensor, lq: int, lk: int, *, causal: bool = False,
                side: str = "right", device=None) -> StructuredMask:
    """The mask of a padded batch: sequence ``b`` has ``lengths[b]`` valid keys, at the start of its ``lk``
    keys (``side="right"``: right padding) or at the end (``side="left"``: left padding, as in batched
    generation). ``causal=True`` also masks future keys, top-left aligned (needs ``lq == lk``).

    ``lengths`` is read once, here: a CUDA tensor of lengths costs one sync per batch, not one per layer.
    Lengths of ``lk`` everywhere give the plain causal (or all-true) mask."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.tolist()
    lens = tuple(int(n) for n in lengths)
    if not lens or any(n < 0 or n > lk for n in lens):
        raise ValueError(f"lengths must be between 0 and lk={lk}, got {list(lens)}")
    if lq < 1 or lk < 1:
        raise ValueError(f"lq and lk must be positive, got {lq}, {lk}")
    if causal and lq != lk:
        raise ValueError(f"causal key padding needs lq == lk (got {lq}, {lk})")
    if causal:
        word = "causal" if min(lens) == lk else ("cpad_r" if side == "right" else "cpad_l")
    else:
        word = "all" if min(lens) == lk else ("kpad_r" if side == "right" else "kpad_l")
    s = Structure(word, lens if word in PADDED else (), lq, lk)
    return StructuredMask(s, device)
