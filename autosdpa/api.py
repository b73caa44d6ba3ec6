"""Public helpers around the dispatcher: explain, available_backends, tune, patch."""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.nn.functional as F

from . import backends as _backends
from .dispatch import deterministic as deterministic_mode  # noqa: F401  (the CLI's name for it)
from .dispatch import dispatcher, pytorch_sdpa, scaled_dot_product_attention
from .problem import Problem
from .tuner import Decision, TuneConfig


def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False) -> Decision:
    """The Decision autosdpa takes for this call (tuning first if the problem is new and mode is 'tune')."""
    return dispatcher.explain(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def available_backends(device=None) -> list[str]:
    """Backends that can run at all on ``device`` (default: CUDA if present, else CPU)."""
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return [b.name for b in _backends.all_backends() if b.unavailable_reason(dev) is None]


def unavailable_reasons(device=None) -> dict[str, str]:
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return {b.name: r for b in _backends.all_backends() if (r := b.unavailable_reason(dev))}


def tune(problems: Iterable[Problem | str], *, db=None, progress: bool = True, device=None, force: bool = False,
         config: TuneConfig | None = None) -> list[Decision]:
    """Tune each problem (a Problem or its key string) on synthetic inputs of its shape; returns Decisions.

    Problems already measured are not re-timed unless ``force``. ``db`` is a path, URL or Store to write to
    (default: the user DB). ``progress`` prints one line per problem."""
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    probs = [p if isinstance(p, Problem) else Problem.parse(p) for p in problems]
    out = []
    with contextlib.ExitStack() as stack:
        if db is not None:
            stack.enter_context(dispatcher.use_store(db))
        for i, p in enumerate(probs):
            d = dispatcher.tune_problem(p, dev, force=force, config=config)
            if progress:
                print(f"[{i + 1}/{len(probs)}] {p.key} -> {d.backend} ({d.reason})", flush=True)
            out.append(d)
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
    F.scaled_dot_product_attention = scaled_dot_product_attention
    return _Patch()


def unpatch() -> None:
    F.scaled_dot_product_attention = pytorch_sdpa
