"""What a dense attention mask really says: its *structure*, read from its values (CPU tensors only).

A mask often says more than it needs: an exactly causal mask is ``is_causal``, an all-true mask is no mask, a
padded batch's mask is a set of shorter sequences. Recognised here, for bool masks and float masks whose values
are exactly 0 and -inf (never -10000 or ``finfo.min``: those differ from -inf on fully masked rows):

===========  =========================================================  ===============================
word         kept key j for query i (batch entry b, valid length n_b)   where it comes from
===========  =========================================================  ===============================
all          every j                                                    a padding mask without padding
causal       j <= i  (Lq == Lk)                                         a materialised causal mask
causal_br    j <= i + Lk - Lq  (Lq < Lk, bottom-right aligned)          a KV cache chunk
kpad_r       j < n_b                                                    encoder padding, right
kpad_l       j >= Lk - n_b                                              decode with a left-padded cache
cpad_r       j <= i and j < n_b  (Lq == Lk)                             HF training batch, right padding
cpad_l       j <= i and j >= Lk - n_b  (Lq == Lk)                       HF generation prefill, left padding
===========  =========================================================  ===============================

The mask may have any shape that broadcasts to (B, H, Lq, Lk) with its head dim 1 (or expanded, stride 0) and
its key dim full. Detection reads two rows of each batch entry first (an O(Lk) rejection: a random mask stops
there), then compares the whole mask with the structure's expected mask, built once and kept (a small LRU).
That comparison runs on every call that uses a structure (``structure_of``): the verdict is never stale, however
the mask was changed (in place, through ``.data``, a numpy view, ``set_``, or an inference tensor).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import threading

import torch
import torch.nn.functional as F

from ..backends.base import PADDED, STRUCTURES as KINDS  # noqa: F401  (the vocabulary, shared with problem keys)

_NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class Structure:
    """A recognised mask structure: its word (``KINDS``) and, for padded kinds, the valid key count of each
    batch entry of the mask (one entry when the mask has no batch dim: every sequence has that length)."""

    word: str
    lengths: tuple[int, ...] = ()
    lq: int = 0
    lk: int = 0

    @property
    def padded(self) -> bool:
        return self.word in PADDED

    @property
    def fill(self) -> int:
        """The share of valid keys in quarters (1: <= 25% ... 4: > 75%), 0 for unpadded kinds: part of the
        problem key, since what a padded rewrite saves depends on it."""
        if not self.padded:
            return 0
        share = sum(self.lengths) / max(1, len(self.lengths) * self.lk)
        return min(4, max(1, math.ceil(share * 4)))

    def describe(self) -> str:
        """For people: e.g. ``causal + right padding (valid keys 96, 60, 23, 0 of 96)``."""
        text = {"all": "all true", "causal": "causal", "causal_br": "causal, bottom-right aligned",
                "kpad_r": "key padding, right", "kpad_l": "key padding, left",
                "cpad_r": "causal + right padding", "cpad_l": "causal + left padding"}[self.word]
        if self.lengths:
            shown = ", ".join(map(str, self.lengths[:8])) + (", ..." if len(self.lengths) > 8 else "")
            text += f" (valid keys {shown} of {self.lk})"
        return text

    def keep(self, rows: torch.Tensor, cols: torch.Tensor, n: int | None) -> torch.Tensor:
        """The kept (True) positions for query rows ``rows`` (R,) and key cols ``cols`` (C,) of a sequence with
        ``n`` valid keys (padded kinds): (1, 1, R, C). ``n`` is a Python int, so a mask is built on any device
        without copying anything to it."""
        i, j = rows[None, None, :, None], cols[None, None, None, :]
        w = self.word
        if w == "all":
            return torch.ones(1, 1, rows.numel(), cols.numel(), dtype=torch.bool, device=rows.device)
        if w == "causal":
            return j <= i
        if w == "causal_br":
            return j <= i + (self.lk - self.lq)
        if w == "kpad_r":
            return (j < n).expand(-1, -1, rows.numel(), -1)
        if w == "kpad_l":
            return (j >= self.lk - n).expand(-1, -1, rows.numel(), -1)
        if w == "cpad_r":
            return (j <= i) & (j < n)
        return (j <= i) & (j >= self.lk - n)  # cpad_l

    def key_range(self, b: int) -> tuple[int, int]:
        """The keys [lo, hi) of batch entry ``b`` that any query keeps (padded kinds)."""
        n = self.lengths[b if len(self.lengths) > 1 else 0]
        return (0, n) if self.word.endswith("_r") else (self.lk - n, self.lk)


def _mask4(m: torch.Tensor) -> torch.Tensor:
    return m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)) if m.dim() < 4 else m


def candidate_shape(m, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The mask as (Bm, 1, Lqm, Lk) when its structure may be read from its values (a plain CPU bool or float
    tensor broadcasting to (B, H, Lq, Lk) with one mask for every head), else None."""
    if (type(m) is not torch.Tensor or m.device.type != "cpu" or m.requires_grad or q.dim() != 4
            or not (m.dtype is torch.bool or m.is_floating_point()) or not 2 <= m.dim() <= 4):
        return None
    m4 = _mask4(m)
    b, lq, lk = q.shape[0], q.shape[2], k.shape[2]
    if m4.shape[1] != 1:
        if m4.stride(1) != 0:  # a per-head mask: its heads would each need a structure
            return None
        m4 = m4[:, :1]
    if m4.shape[0] not in (1, b) or m4.shape[2] not in (1, lq) or m4.shape[3] != lk or lk == 0 or lq == 0:
        return None
    return m4


def _kept(rows: torch.Tensor) -> torch.Tensor | None:
    """Which positions a (bool or 0/-inf float) mask keeps; None when a float mask has other values."""
    if rows.dtype is torch.bool:
        return rows
    keep = rows == 0
    if not bool((keep | (rows == _NEG_INF)).all()):
        return None
    return keep


def _guess(m4: torch.Tensor, lq: int, lk: int) -> Structure | None:
    """The one structure the first and last query rows allow (O(Bm * Lk)), not yet checked on the rest."""
    last = m4.shape[2] - 1
    rows = _kept(m4[:, 0, (0, last), :] if last else m4[:, 0, :1, :])
    if rows is None:
        return None
    first, final = rows[:, 0], rows[:, -1]
    n0, n1 = first.sum(-1), final.sum(-1)
    j = torch.arange(lk)

    def prefix(r, n):
        return bool((r == (j[None] < n[:, None])).all())

    def suffix(r, n):
        return bool((r == (j[None] >= lk - n[:, None])).all())
    lens = tuple(int(x) for x in n1)
    if min(lens) == lk and bool(n0.eq(lk).all()):
        return Structure("all", (), lq, lk)
    single_row = last == 0 or bool(torch.equal(first, final))
    if single_row:  # the same keys for every query: key padding
        if prefix(final, n1):
            return Structure("kpad_r", lens, lq, lk)
        if suffix(final, n1):
            return Structure("kpad_l", lens, lq, lk)
        return None
    if last != lq - 1:
        return None
    if lq == lk and prefix(final, n1) and bool(n0.eq((n1 > 0).long()).all()):
        return Structure("causal" if min(lens) == lk else "cpad_r", () if min(lens) == lk else lens, lq, lk)
    if lq == lk and suffix(final, n1) and bool(n0.eq((n1 == lk).long()).all()) and min(lens) < lk:
        return Structure("cpad_l", lens, lq, lk)
    if lq < lk and min(lens) == lk and bool(n0.eq(lk - lq + 1).all()) and prefix(first, n0):
        return Structure("causal_br", (), lq, lk)
    return None


class _Expected:
    """Expected masks by (structure, mask shape, dtype), least recently used first out."""

    def __init__(self, max_bytes: int = 256 << 20, max_items: int = 8):
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.max_bytes, self.max_items = max_bytes, max_items

    def get(self, s: Structure, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        key = (s, shape, dtype)
        with self._lock:
            t = self._items.get(key)
            if t is not None:
                self._items.move_to_end(key)
                return t
        t = expected_mask(s, shape, dtype)
        with self._lock:
            self._items[key] = t
            while len(self._items) > self.max_items or (
                    len(self._items) > 1 and sum(x.numel() * x.element_size() for x in self._items.values())
                    > self.max_bytes):
                self._items.popitem(last=False)
        return t

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def expected_mask(s: Structure, shape: tuple, dtype: torch.dtype, device=None) -> torch.Tensor:
    """The mask of structure ``s`` in ``shape`` (Bm, 1, Lqm, Lk) and ``dtype`` (bool, or 0/-inf float), built on
    ``device`` (default CPU) itself: a CUDA mask object is materialised with no host-to-device copy."""
    bm, _, lqm, lk = shape
    rows = torch.arange(lqm, device=device) if lqm == s.lq else torch.zeros(1, dtype=torch.long, device=device)
    cols = torch.arange(lk, device=device)
    keep = torch.cat([s.keep(rows, cols, n) for n in (s.lengths or (None,))])
    keep = keep.expand(bm, 1, lqm, lk).contiguous()
    if dtype is torch.bool:
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, _NEG_INF)


_EXPECTED = _Expected()


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality of two same-shape masks; a contiguous one is compared 8 bytes at a time."""
    if a.is_contiguous() and (a.numel() * a.element_size()) % 8 == 0 and a.data_ptr() % 8 == 0:
        if torch.equal(a.view(torch.int64), b.view(torch.int64)):
            return True
        if a.dtype is torch.bool:
            return False  # a float mask may still hold -0.0 where 0.0 is expected: compare values
    return bool(torch.equal(a, b))


def detect(m, q: torch.Tensor, k: torch.Tensor) -> Structure | None:
    """The structure of dense mask ``m`` for queries ``q`` and keys ``k`` (4-D), checked on all of its values;
    None when it has none of ``KINDS`` (or its values cannot be read here)."""
    m4 = candidate_shape(m, q, k)
    if m4 is None:
        return None
    s = _guess(m4, q.shape[2], k.shape[2])
    if s is None:
        return None
    if s.word == "all" and m4.shape[2] == 1 and m4.shape[0] == 1:
        return s  # both rows read were all of it
    want = _EXPECTED.get(s, tuple(m4.shape), m4.dtype)
    return s if _equal(m4, want) else None


def forget() -> None:
    """Drop the expected masks kept (memory)."""
    _EXPECTED.clear()


_trust = threading.local()


@contextlib.contextmanager
def trusted(mask, structure: Structure | None):
    """Within the block (this thread), ``structure`` is taken as ``mask``'s without reading the mask again:
    the dispatcher has just checked it (or the mask object said it) for this very call."""
    prev = getattr(_trust, "pair", None)
    _trust.pair = (mask, structure)
    try:
        yield
    finally:
        _trust.pair = prev


def trusted_structure(mask) -> Structure | None:
    """The structure trusted for ``mask`` in this block (``trusted``), or None."""
    pair = getattr(_trust, "pair", None)
    return pair[1] if pair is not None and pair[0] is mask else None


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
            dense = self._dense[dev] = expected_mask(self.structure, self.mask_shape, torch.bool, dev)
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
