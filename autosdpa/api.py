"""Public helpers around the dispatcher: explain, available_backends, tune, patch."""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.nn.functional as F

from . import backends as _backends
from . import dispatch
from .backends.torch_backends import torch_flags
from .problem import Problem
from .store import Store
from .tuner import Decision, TuneConfig


@contextlib.contextmanager
def deterministic_mode(on: bool):
    """PyTorch's deterministic-algorithms switch set to ``on`` for the block (``det=`` is part of a problem's
    key, and restricts what may run)."""
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if prev[0] == on:
        yield
        return
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])


def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False) -> Decision:
    """The Decision autosdpa takes for this call (tuning first if the problem is new and mode is 'tune')."""
    call = dispatch._make_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                               dispatch._needs_grad(query, key, value))
    if call is None:
        return Decision("pytorch", "inputs autosdpa does not key (nested, subclass, odd arguments): "
                        "passed to PyTorch", source="passthrough")
    with dispatch._state.lock:
        decision, _, _ = dispatch.decide(call, dispatch._control, torch_flags(), allow_tune=True)
    return decision


def available_backends(device=None) -> list[str]:
    """Backends that can run at all on ``device`` (default: CUDA if present, else CPU)."""
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return [b.name for b in _backends.all_backends() if b.unavailable_reason(dev) is None]


def unavailable_reasons(device=None) -> dict[str, str]:
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return {b.name: r for b in _backends.all_backends() if (r := b.unavailable_reason(dev))}


@contextlib.contextmanager
def _using_store(db):
    if db is None:
        yield dispatch.get_store()
        return
    st = dispatch._state
    prev_store, prev_meas = st.store, st.measurements
    st.store, st.measurements = (db if isinstance(db, Store) else Store(db)), {}
    try:
        yield st.store
    finally:
        if not isinstance(db, Store):
            st.store.close()
        st.store, st.measurements = prev_store, prev_meas
        dispatch.clear_plans()


def tune(problems: Iterable[Problem | str], *, db=None, progress: bool = True, device=None, force: bool = False,
         config: TuneConfig | None = None) -> list[Decision]:
    """Tune each problem (a Problem or its key string) on synthetic inputs of its shape; returns Decisions.

    Problems already measured are not re-timed unless ``force``. ``db`` is a path, URL or Store to write to
    (default: the user DB). ``progress`` prints one line per problem."""
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    probs = [p if isinstance(p, Problem) else Problem.parse(p) for p in problems]
    out = []
    st = dispatch._state
    with st.lock, _using_store(db):  # the lock first: no concurrent miss may save into ``db``
        prev_cfg = st.config
        st.config = config or st.config
        try:
            for i, p in enumerate(probs):
                call = p.make_call(dev)
                if force:
                    from .environment import environment
                    fp, _ = environment(dev)
                    st.measurements[(fp, Problem.from_call(call, st.threshold).key)] = {}
                with deterministic_mode(p.deterministic):
                    d, _, _ = dispatch.decide(call, ("tune", None), (True,) * 4, allow_tune=True)
                if progress:
                    print(f"[{i + 1}/{len(probs)}] {p.key} -> {d.backend} ({d.reason})", flush=True)
                out.append(d)
        finally:
            st.config = prev_cfg
    return out


class _Patch:
    """Context manager returned by ``patch()``: ``with autosdpa.patch(): ...`` unpatches on exit."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        unpatch()
        return False


def patch() -> _Patch:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` through autosdpa (code that looks it up
    at call time, e.g. ``nn.MultiheadAttention`` and most model code, then uses autosdpa)."""
    F.scaled_dot_product_attention = dispatch.scaled_dot_product_attention
    return _Patch()


def unpatch() -> None:
    F.scaled_dot_product_attention = dispatch._sdpa
