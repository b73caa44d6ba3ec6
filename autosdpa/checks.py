"""The tuner's correctness check: one reference per call, shared by every candidate.

A wrong backend must never win, but checking must not cost more than the call: when the reference for the
whole call would be large, it is computed for a part only (the first and last batch entries and kv heads,
with every query head that reads them; forward-only checks also keep only the first and last query rows),
and each candidate's output and gradients are sliced the same way. Non-finite values anywhere in a
candidate's output still reject it whenever the inputs are finite.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from . import forms
from .backends.base import Call
from .memory import fmt_bytes, max_len, room
from .reference import GRAD_FACTOR, broadcast_shape, check_shapes, compute_dtype, tolerance

# Work of the reference -- multiply-adds (B·Hq·Lq·Lk·(D+Dv)) plus elements of q, k, v converted to its dtype --
# above which only a part of the call is checked: about a millisecond of float64 work on a CPU core, or
# 1/CHECK_SHARE of the whole call's work when that is more.
CHECK_WORK = 1 << 20
CHECK_SHARE = 64
EDGE_ROWS = 8  # query rows kept at each end when rows are cut


class InvalidInputs(Exception):
    """The reference itself rejects the inputs: F.sdpa will raise its own error for them."""


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


@dataclasses.dataclass(frozen=True)
class Block:
    """One batch entry and one kv head of a 4-D call (B, H, L, D), with the query heads that read it: views."""
    b: int
    h: int
    group: int  # query heads per kv head

    def q(self, t: Tensor) -> Tensor:
        """The block of a tensor shaped like q (the output, its gradient, q's gradient)."""
        return t[self.b:self.b + 1, self.h * self.group:(self.h + 1) * self.group]

    def kv(self, t: Tensor) -> Tensor:
        return t[self.b:self.b + 1, self.h:self.h + 1]

    def mask(self, m: Tensor) -> Tensor:
        """The block of a mask that broadcasts to (B, Hq, Lq, Lk): each of its first two dims is cut only
        where it is not 1 (a per-head mask (1, H, Lq, Lk) keeps its one batch entry)."""
        m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
        if m.shape[0] > 1:
            m = m[self.b:self.b + 1]
        if m.shape[1] > 1:
            m = m[:, self.h * self.group:(self.h + 1) * self.group]
        return m


@dataclasses.dataclass(frozen=True)
class Part:
    """Which blocks (and, forward only, which query rows) of a 4-D call are checked."""
    blocks: tuple[Block, ...]
    rows: tuple[tuple[int, int], ...] | None  # None: all rows
    total_slices: int

    def rows_of(self, t: Tensor) -> Tensor:
        return t if self.rows is None else torch.cat([t[..., a:b, :] for a, b in self.rows], dim=-2)

    def describe(self) -> str:
        slices = sum(blk.group for blk in self.blocks)
        rows = "" if self.rows is None else f", query rows {', '.join(f'{a}..{b - 1}' for a, b in self.rows)}"
        return f"checked on {slices} of {self.total_slices} batch x head slices{rows}"


def choose_part(call: Call, max_work: int | None = None) -> Part | None:
    """The part of ``call`` to check, or None to check all of it (small calls, or shapes kept simple): the
    first and last batch entries x first and last kv heads, then only the last of each, then (forward only)
    only the first and last EDGE_ROWS query rows, until the reference's work fits ``max_work`` (default
    CHECK_WORK) or 1/CHECK_SHARE of the whole."""
    max_work = CHECK_WORK if max_work is None else max_work
    q, k, v, m = call.query, call.key, call.value, call.dense_mask
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or not (q.shape[0] == k.shape[0] == v.shape[0]):
        return None
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    if hkv == 0 or hq % hkv:
        return None
    full = (b, hq, lq, lk)
    if m is not None and (m.dim() > 4 or broadcast_shape(m.shape, full) != full):
        return None
    group = hq // hkv
    per_block = group * (lq * lk * (d + dv) + lq * d) + lk * (d + dv)
    if b * hkv * per_block <= max_work:
        return None
    max_work = max(max_work, b * hkv * per_block // CHECK_SHARE)
    for bs, hs in (({0, b - 1}, {0, hkv - 1}), ({b - 1}, {hkv - 1})):
        blocks = tuple(Block(i, h, group) for i in sorted(bs) for h in sorted(hs))
        if len(blocks) * per_block <= max_work:
            break
    rows = None
    if not call.needs_grad and len(blocks) * per_block > max_work and lq > 2 * EDGE_ROWS:
        rows = ((0, EDGE_ROWS), (lq - EDGE_ROWS, lq))
    return Part(blocks, rows, b * hq)


_WHOLE = Block(0, 0, 0)  # stands for the whole call in Check's pieces

# Peak memory of the reference, in score-sized tensors of its dtype (peak RSS on a CPU, torch 2.13): with
# autograd each chunk keeps its softmax (nan_to_num's input and output) until the backward pass; RSS showed
# 2.3-3 of them in float32 and up to 6 in float64 (the allocator keeps freed chunks), so 6. Any chunk also
# makes about three temporaries on the way (scores, scaled, masked).
_KEPT_PER_SCORE = 6
_TEMPS_PER_CHUNK = 3
_JUDGE_TEMPS = 5  # max_error: the candidate's piece in the reference dtype, masks, two gathers, the difference


_CHOOSE = object()


def reference_bytes(call: Call, part: Part | None | object = _CHOOSE) -> tuple[int, int]:
    """(peak bytes while the reference is computed, bytes it keeps while candidates are judged) for ``call``
    checked on ``part`` (None: the whole call; by default what ``Check`` picks). Upper bounds."""
    q, k, v = call.query, call.key, call.value
    if part is _CHOOSE:
        part = None if q.is_nested else choose_part(call)
    size = 8 if compute_dtype(q.dtype) == torch.float64 else 4
    d, dv, lq, lk = q.shape[-1], v.shape[-1], max_len(q), max_len(k)
    mask = call.dense_mask
    if isinstance(part, Part):  # equal blocks, one after the other: (batch entry, kv head, its query heads)
        blk = part.blocks[0]
        pieces, lead, rep, kv_rows = len(part.blocks), blk.group, blk.group, lk
        rows = sum(b - a for a, b in part.rows) if part.rows else lq
        mask_n = 0 if mask is None else blk.mask(mask).numel()
    else:  # the whole call (a jagged one is checked per sequence: at most this)
        pieces, rows = 1, lq
        lead = (q.values() if q.is_nested else q).numel() // max(1, lq * d)
        kv_rows = (k.values() if k.is_nested else k).numel() // max(1, k.shape[-1])
        rep = q.shape[-3] // k.shape[-3] if q.dim() >= 4 and not q.is_nested and k.shape[-3] else 1
        mask_n = 0 if mask is None else mask.numel()
    q_n = lead * lq * d
    scores = lead * rows * lk * size
    # reference_attention's chunks of query rows: chunk_bytes (256 MiB) // (lead * d * lk * size) rows each
    chunk = min(scores, max(1, (256 << 20) // (lead * d * lk * size)) * lead * lk * size)
    inputs = (q_n + kv_rows * (d + dv) * (1 + (rep if rep > 1 else 0)) + mask_n) * size  # in its dtype
    out = lead * rows * dv * size
    grads = (q_n + kv_rows * (d + dv)) * q.element_size() if call.needs_grad else 0
    work = _TEMPS_PER_CHUNK * chunk + (_KEPT_PER_SCORE * scores if call.needs_grad else 0)
    kept = out + grads
    judge = _JUDGE_TEMPS * max(out, (max(q_n, kv_rows * max(d, dv)) * size) if call.needs_grad else 0)
    return pieces * kept + inputs + work, pieces * kept + judge


class Check:
    """The reference for one call (or a part of it), and the verdict on each candidate's output."""

    def __init__(self, call: Call, grad_out: Tensor | None):
        """Raises InvalidInputs when the reference rejects the inputs."""
        self.call, self.tol, self.form = call, tolerance(call), forms.form_of(call)
        self.expected_shape = _output_shape(call)
        self.part: Part | None = None
        # (block, reference output, reference gradients of q, k, v) per checked block; None: not checked
        self.pieces: list[tuple[Block, Tensor, tuple[Tensor, ...]]] | None = None
        self.too_big: str | None = None  # why the reference was not computed
        try:
            if self.form is forms.dense:  # jagged calls: checked whole, per sequence (forms.jagged)
                check_shapes(call)
                self.part = choose_part(call)
            blocks = self.part.blocks if self.part is not None else (_WHOLE,)
            # on a CPU an allocation past the memory kills the process instead of raising: estimate first
            need, fits = reference_bytes(call, self.part)[0], room(call.query.device)
            if fits is not None and need > fits[0]:
                self.too_big = f"the reference needs ~{fmt_bytes(need)}, {fmt_bytes(fits[1])} free"
            else:
                self.pieces = [self._reference(blk, grad_out) for blk in blocks]
        except RuntimeError as e:
            if not is_oom(e):
                raise InvalidInputs(str(e)) from e
            self.pieces = None  # too big to check: timed unchecked, and said so
        self._inputs_finite: bool | None = None

    @property
    def unchecked(self) -> str | None:
        """Why outputs are not compared with the reference (None when they are)."""
        if self.call.dropout_p:
            return "dropout: output not compared"
        if self.pieces is None:
            return f"{self.too_big or 'reference out of memory'}: output not compared"
        return None

    @property
    def inputs_finite(self) -> bool:
        """Outside the checked part, finite inputs must give finite outputs (asked only when one is not)."""
        if self._inputs_finite is None:
            c = self.call
            self._inputs_finite = _finite(c.query, (c.key, c.value))
        return self._inputs_finite

    def _reference(self, blk: Block, grad_out: Tensor | None):
        call = self.call
        q, k, v = (t.detach() for t in (call.query, call.key, call.value))
        mask = call.attn_mask
        if blk is not _WHOLE:
            q, k, v = blk.q(q), blk.kv(k), blk.kv(v)
            mask = blk.mask(mask) if call.dense_mask is not None else mask
        if not call.needs_grad:
            rows = self.part.rows if self.part is not None else None
            with torch.no_grad():
                sub = dataclasses.replace(call, query=q, key=k, value=v, attn_mask=mask)
                return blk, self.form.reference(sub, rows=rows), ()
        xs = tuple(t.clone().requires_grad_() for t in (q, k, v))
        ref = self.form.reference(dataclasses.replace(call, query=xs[0], key=xs[1], value=xs[2], attn_mask=mask))
        g = grad_out if blk is _WHOLE else blk.q(grad_out)
        grads = torch.autograd.grad(ref, xs, g.to(dtype=ref.dtype))
        return blk, ref.detach(), grads

    def judge(self, out: Tensor, grads: tuple[Tensor, ...]) -> tuple[float | None, str | None]:
        """(max error or None when not compared, rejection reason or None when it passes)."""
        if self.expected_shape is not None and tuple(out.shape) != self.expected_shape:
            return None, f"wrong result: output shape {tuple(out.shape)}, expected {self.expected_shape}"
        if self.call.dropout_p or self.pieces is None:  # random, or too big to check: finite values at least
            if not _finite(out, grads) and (self.call.dropout_p or self.inputs_finite):
                return None, "wrong result: non-finite output"
            return None, None
        part = self.part
        if part is not None and not _finite(out, grads) and self.inputs_finite:
            return None, f"wrong result: non-finite output (outside the checked part: {part.describe()})"
        err = 0.0
        for blk, ref, ref_grads in self.pieces:
            whole = blk is _WHOLE
            err = max(err, self.form.max_error(out if whole else part.rows_of(blk.q(out)), ref))
            for i, (gr, rgr) in enumerate(zip(grads, ref_grads)):
                gr = gr if whole else (blk.q(gr) if i == 0 else blk.kv(gr))
                err = max(err, self.form.max_error(gr, rgr) / GRAD_FACTOR)
        if not err <= self.tol:
            where = f" ({part.describe()})" if part is not None else ""
            return (None if math.isinf(err) else err), (
                f"wrong result: error {err:.3g} vs reference exceeds tolerance {self.tol:.3g}{where}")
        return err, None


def _output_shape(call: Call) -> tuple[int, ...] | None:
    q, v = call.query, call.value
    if q.is_nested:  # ragged: the jagged max_error compares structure
        return None
    lead = broadcast_shape(q.shape[:-1], tuple(v.shape[:-2]) + (q.shape[-2],))
    return tuple(lead or q.shape[:-1]) + (v.shape[-1],)


def _finite(out: Tensor, grads: tuple[Tensor, ...]) -> bool:
    return all(bool(torch.isfinite(t.values() if t.is_nested else t).all()) for t in (out, *grads))
