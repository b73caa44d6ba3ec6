"""autosdpa's own overrides: ``backend(...)`` forces or restricts, ``mode(...)`` sets tune/lookup/off.

Like PyTorch's sdpa flags they are process-wide (not per thread), and nest: leaving a block restores
what was in force before it.
"""
from __future__ import annotations

import contextlib

from . import backends as _backends
from . import dispatch
from .config import MODES


def _set(mode, forced) -> None:
    dispatch._control = None if mode is None and forced is None else (mode, forced)


@contextlib.contextmanager
def backend(*names):
    """Run only the named backend(s): ``backend("flash")`` forces one (an ineligible input raises a
    RuntimeError saying why), ``backend("flash", "cudnn")`` or ``backend(["flash", "cudnn"])`` restricts the
    candidates to those."""
    if len(names) == 1 and isinstance(names[0], (list, tuple)):
        names = tuple(names[0])
    if not names:
        raise ValueError("autosdpa.backend() needs at least one backend name")
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"backend names are strings, got {n!r}")
        _backends.get(n)  # ValueError for unknown names, listing the known ones
    prev = dispatch._control
    _set(prev[0] if prev else None, tuple(dict.fromkeys(names)))
    try:
        yield
    finally:
        dispatch._control = prev


@contextlib.contextmanager
def mode(name: str):
    """``"tune"`` (default): time on first sight; ``"lookup"``: use stored measurements only, a miss takes
    PyTorch's choice; ``"off"``: plain ``F.scaled_dot_product_attention``."""
    if name not in MODES:
        raise ValueError(f"autosdpa mode must be one of {MODES}, got {name!r}")
    prev = dispatch._control
    _set(name, prev[1] if prev else None)
    try:
        yield
    finally:
        dispatch._control = prev
