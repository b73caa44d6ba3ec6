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
autosdpa it routes to the rewrites that its structure allows (``autosdpa.backends.rewrites``), checked and timed
like any backend.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .forms.structure import Structure, expected_mask

__all__ = ["StructuredMask", "key_padding"]

_sdpa = F.scaled_dot_product_attention  # PyTorch's own, even after autosdpa.patch()


class StructuredMask(torch.Tensor):
    """A boolean attention mask of shape (B, 1, Lq, Lk) given by its structure (``forms.structure``): the
    valid key count of each sequence, padding side, causal or not. It holds no mask data until materialised."""

    structure: Structure
    mask_device: torch.device

    @staticmethod
    def __new__(cls, structure: Structure, device=None):
        self = torch.Tensor._make_subclass(cls, torch.empty(0, dtype=torch.bool))
        self.structure = structure
        self.mask_device = torch.device(device if device is not None else "cpu")
        self._dense = {}
        return self

    def __init__(self, structure: Structure, device=None):
        super().__init__()

    @property
    def mask_shape(self) -> tuple[int, int, int, int]:
        s = self.structure
        return (max(1, len(s.lengths)), 1, s.lq, s.lk)

    def materialize(self, device=None) -> torch.Tensor:
        """The dense bool mask (B, 1, Lq, Lk) this object stands for, on ``device`` (default: its own); built
        once per device and kept."""
        dev = torch.device(device) if device is not None else self.mask_device
        dense = self._dense.get(dev)
        if dense is None:
            dense = self._dense[dev] = expected_mask(self.structure, self.mask_shape, torch.bool).to(dev)
        return dense

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _sdpa:  # F.sdpa with this mask: exactly F.sdpa with the dense mask
            args = list(args)
            q = args[0] if args else kwargs["query"]
            if len(args) > 3 and isinstance(args[3], StructuredMask):
                args[3] = args[3].materialize(q.device)
            elif isinstance(kwargs.get("attn_mask"), StructuredMask):
                kwargs["attn_mask"] = kwargs["attn_mask"].materialize(q.device)
            return _sdpa(*args, **kwargs)
        return super().__torch_function__(func, types, args, kwargs)

    def __repr__(self) -> str:  # type: ignore[override]
        return f"{type(self).__name__}({_describe(self)})"

    def __reduce_ex__(self, proto):
        return (type(self), (self.structure, self.mask_device))


def _describe(m: StructuredMask) -> str:
    s = m.structure
    lens = f", lengths={list(s.lengths)}" if s.lengths else ""
    return f"{s.word}, lq={s.lq}, lk={s.lk}{lens}, device={m.mask_device}"


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
    keep_lens = lens if word in ("kpad_r", "kpad_l", "cpad_r", "cpad_l") else ()
    s = Structure(word, keep_lens, lq, lk)
    return StructuredMask(s, device)
