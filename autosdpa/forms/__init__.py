"""What a call really is, before any backend runs it: its *form*. The one place the dispatcher, the checks and
the tuner ask, once per call.

* ``dense``   -- plain tensors (B..., H, L, E), maybe a mask;
* ``jagged``  -- NestedTensor inputs (B, H, ragged L, E), their own backends (``backends/njt.py``);
* a dense call whose mask has a *structure* (``structure``: causal, all-true, key padding, causal + padding;
  read from a CPU mask's values, or said by an ``autosdpa.masks`` object) is still dense, with
  ``Call.structure`` set: the rewrites (``rewrites.py``, backends like any other) take exactly those.

A new mask structure goes in ``structure.py`` (its word, how two rows suggest it, its expected mask) and a
rewrite for it in ``rewrites.py``. A form is a module with the same functions: ``problem_of``,
``pytorch_choice``, ``degenerate_reason``, ``invalid_reason``, ``bucket_key``, ``reference``, ``max_error``,
``random_output``, ``synthetic_call``; ``form_of(call)`` says which.
"""
from __future__ import annotations

import torch

from ..backends.base import Call
from ..problem import DTYPE_NAMES, Problem
from . import dense, jagged, rewrites  # noqa: F401  (rewrites registers the mask_* backends)

__all__ = ["dense", "jagged", "form_of", "make_call", "needs_grad", "problem_of", "synthetic_call",
           "bucket_key"]

needs_grad = dense.needs_grad


def form_of(call: Call):
    """The form module of ``call``: ``jagged`` for NestedTensor inputs, else ``dense``."""
    return jagged if call.query.is_nested else dense


def make_call(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
              grad: bool | None = None) -> Call | None:
    """A Call for inputs autosdpa handles; None sends the call straight to F.sdpa (which may reject it)."""
    if (not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool)
            or not isinstance(dropout_p, (float, int)) or isinstance(dropout_p, bool)
            or not (scale is None or isinstance(scale, (float, int)) and not isinstance(scale, bool))
            or not isinstance(query, torch.Tensor)
            or query.device.type not in ("cpu", "cuda") or query.dtype not in DTYPE_NAMES):
        return None
    form = jagged if jagged.any_jagged(query, key, value) else dense
    return form.make_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, grad)


def problem_of(call: Call, threshold: int | None = 16) -> Problem:
    return form_of(call).problem_of(call, threshold)


def synthetic_call(problem: Problem, device="cpu", seed: int = 0) -> Call:
    """Synthetic inputs of ``problem``'s shape (its form from its layout), for offline tuning."""
    return (jagged if problem.layout == "jagged" else dense).synthetic_call(problem, device, seed)


def bucket_key(fk: tuple, q, k, v, m, threshold: int | None) -> tuple | None:
    """The dispatcher's bucket key of a call from its fast key and raw arguments (None: decide per call)."""
    # a plain tensor is dense: the NestedTensor isinstance check costs ~2 us, on every new length of a decode loop
    form = dense if q.__class__ is torch.Tensor or not jagged.is_jagged(q) else jagged
    return form.bucket_key(fk, q, k, v, m, threshold)
