"""The dispatcher's fast key: what a cache hit looks up, read from the call's arguments.

``py_key`` defines it. ``_fastkey`` (C, built at install when a compiler is there) builds the same tuple for
plain ``torch.Tensor`` inputs and runs the whole cache hit (key, lookup, call) without the interpreter: on a
hit that is all of autosdpa's overhead, and in Python each tensor attribute read pays the interpreter's
generic lookup before PyTorch's getter runs. The C key is used only after it has given ``py_key``'s answer
on sample calls; where it is not built or not right, the dispatcher's Python path does the same work.
"""
from __future__ import annotations

import inspect
import logging

import torch
from torch.nn.attention.bias import CausalBias, causal_lower_right

from .backends.torch_checks import FLAG_GETTERS
from .masks import StructuredMask

log = logging.getLogger("autosdpa")

_gf, _ge, _gm, _gc = FLAG_GETTERS
_det = torch._C._get_deterministic_algorithms
_Tensor = torch.Tensor


def mask_sig(m):
    if m.__class__ is CausalBias:
        return (m.variant, m.seq_len_q, m.seq_len_kv)
    if m.__class__ is StructuredMask:  # its lengths vary per batch: the plan reads them per call
        s = m.structure
        return (StructuredMask, s.word, s.lq, s.lk, len(s.lengths), m.mask_device)
    return (m.shape, m.dtype, m.__class__, m.requires_grad, m.device)


def py_key(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, overrides_key):
    """Shapes, dtype, device, mask kind, flags, grad, PyTorch's sdp flags and autosdpa's overrides: what
    decides a plan (strides are the plan's own business, see ``plans``). The device, not its index: a meta
    tensor's index is a CPU tensor's (-1). Inputs that are not plain tensors (subclasses with their own
    ``__torch_function__``, numpy arrays) add their classes, so they never share a plain call's plan."""
    fk = (query.shape, key.shape, value.shape, query.dtype, query.device,
          None if attn_mask is None else mask_sig(attn_mask), dropout_p, is_causal, enable_gqa,
          query.requires_grad, _gf(), _ge(), _gm(), _gc(), _det(), overrides_key)
    if query.__class__ is not _Tensor or key.__class__ is not _Tensor or value.__class__ is not _Tensor:
        return (*fk, (query.__class__, key.__class__, value.__class__))
    return fk


def _samples():
    """Calls whose keys must agree: plain, masked (bool, float, CausalBias), grad, a Parameter (the slow path)."""
    x = torch.zeros(1, 2, 3, 4)
    g = torch.zeros(2, 3, 4, requires_grad=True)
    p = torch.nn.Parameter(torch.zeros(1, 2, 3, 4))
    yield (x, x, x, None, 0.0, False, False, 0)
    yield (x, x[:, :1], x, torch.ones(3, 3, dtype=torch.bool), 0.1, True, True, 3)
    yield (x.half(), x.half(), x.half(), torch.zeros(1, 1, 3, 3), 0.0, False, False, 0)
    yield (g, g, g, causal_lower_right(3, 3), 0.0, False, False, 1)
    yield (p, x, x, None, 0.0, False, False, 0)


def _load_native():
    """(the C module, set up and its key checked against ``py_key``, or None; why not)."""
    try:
        from . import _fastkey
    except ImportError as e:
        log.debug("autosdpa: the C fast key is not built (%s); using the Python one", e)
        return None, "not built (it is compiled when autosdpa is installed where a C compiler is found)"
    T = torch.Tensor
    try:
        _fastkey.init(T, *(inspect.getattr_static(T, a) for a in ("shape", "dtype", "requires_grad")),
                      inspect.getattr_static(T, "device"), (_gf, _ge, _gm, _gc, _det), py_key, mask_sig)
        if any(_fastkey.key(*s) != py_key(*s) for s in _samples()):
            raise ValueError("its keys differ from the Python key's")
    except Exception as e:  # a PyTorch whose Tensor is laid out differently: the Python key is always right
        log.warning("autosdpa: not using the C fast key (%s); using the Python one", e)
        return None, f"not usable with this PyTorch ({e})"
    return _fastkey, ""


_native, _why_not = _load_native()


def key_function(native: bool = True):
    """The key the hot path calls: the C one when asked for and available, else ``py_key``."""
    return _native.key if native and _native is not None else py_key


def hit_function(plans: dict, sdpa, native: bool = True):
    """The C hit function bound to ``plans`` and PyTorch's ``sdpa``, or None where the C key is not in use.
    ``hit(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, overrides_key)`` returns the output of a
    cache hit; on a miss, a tuple: the fast key, or () where it could not be built."""
    if not native or _native is None:
        return None
    _native.bind(plans, sdpa)
    return _native.hit


def forget() -> None:
    """The plans were cleared: the C hit path must not reuse the last plan it found."""
    if _native is not None:
        _native.forget()


def native_available() -> bool:
    return _native is not None


def describe(native: bool = True) -> str:
    """Which hot path runs, for ``autosdpa doctor``."""
    if _native is None:
        return f"Python (the C fast key is {_why_not})"
    return "C fast key" if native else "Python (AUTOSDPA_NATIVE=0)"


__all__ = ["py_key", "mask_sig", "key_function", "hit_function", "forget", "native_available", "describe"]
