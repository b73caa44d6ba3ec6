"""autosdpa's own overrides: ``backend(...)`` forces or restricts, ``mode(...)`` sets tune/lookup/off.

Like PyTorch's sdpa flags they are process-wide (not per thread), and nest: leaving a block restores what was
in force before it. The dispatcher owns the value; these context managers only ask it to change.
"""
from __future__ import annotations

import contextlib
import dataclasses

from . import backends as _backends
from .config import MODES
from .dispatch import dispatcher


@contextlib.contextmanager
def _overriding(**changes):
    prev = dispatcher.overrides
    dispatcher.set_overrides(dataclasses.replace(prev, **changes))
    try:
        yield
    finally:
        dispatcher.set_overrides(prev)


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
    return _overriding(backends=tuple(dict.fromkeys(names)))


def mode(name: str):
    """``"tune"`` (default): time on first sight; ``"lookup"``: use stored measurements only, a miss takes
    PyTorch's choice; ``"off"``: plain ``F.scaled_dot_product_attention``."""
    if name not in MODES:
        raise ValueError(f"autosdpa mode must be one of {MODES}, got {name!r}")
    return _overriding(mode=name)
