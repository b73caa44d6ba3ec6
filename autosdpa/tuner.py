"""First-sight tuning: check every eligible backend against the reference, time the survivors side by
side, and pick the winner (near-ties go to PyTorch's own choice, so decisions are stable)."""
from __future__ import annotations

import dataclasses
import logging
import math
import os

import torch

from . import nested
from .backends.base import Backend, Call
from .reference import GRAD_FACTOR, max_error, reference_attention, tolerance
from .store import Measurement
from .timing import summarize, time_interleaved

log = logging.getLogger("autosdpa")

TIE_TOLERANCE = 0.03  # at least 3%: below that, a "win" is usually noise between runs


@dataclasses.dataclass
class TuneConfig:
    budget_s: float = 1.0          # timing time per problem (checks and warm-up come on top)
    memory_fraction: float = 0.8   # of free device memory a candidate may need
    min_rounds: int = 5
    max_rounds: int = 50

    @classmethod
    def from_env(cls) -> "TuneConfig":
        from .config import Settings

        return cls(budget_s=Settings.from_env().budget_s)


@dataclasses.dataclass
class Decision:
    """What autosdpa chose for one problem, and the evidence."""
    backend: str
    reason: str
    timings: dict[str, float | None] = dataclasses.field(default_factory=dict)
    rejected: dict[str, str] = dataclasses.field(default_factory=dict)
    problem: str = ""
    pytorch_choice: str | None = None
    source: str = ""  # tuned | cache | shared | default | forced | passthrough

    def __str__(self) -> str:
        return f"{self.backend}: {self.reason}"


class InvalidInputs(Exception):
    """The reference itself rejects the inputs: F.sdpa will raise its own error for them."""


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return None  # CPU: no reliable number; host memory is rarely the limit at tuning sizes


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def measure(call: Call, backends: list[Backend], config: TuneConfig | None = None,
            tuned_shape: str = "") -> list[Measurement]:
    """Check and time ``backends`` (all already eligible) on ``call``; one Measurement each."""
    config = config or TuneConfig()
    device = call.query.device
    results: dict[str, Measurement] = {}
    free = _free_bytes(device)
    runnable = []
    for b in backends:
        need = b.workspace_bytes(call)
        if free is not None and need > config.memory_fraction * free:
            results[b.name] = Measurement(b.name, "skipped", detail=f"needs ~{need / 2**30:.1f} GiB, "
                                          f"{free / 2**30:.1f} GiB free", tuned_shape=tuned_shape)
        else:
            runnable.append(b)

    train = call.needs_grad
    q, k, v = (t.detach() for t in (call.query, call.key, call.value))
    if train:  # one upstream gradient (F.sdpa's output has q's shape with v's last dim) and one input set
        g = nested.random_output(call) if q.is_nested else torch.randn(
            *q.shape[:-1], v.shape[-1], generator=torch.Generator().manual_seed(0))
        grad_out = g.to(device=device, dtype=q.dtype)
        xs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    try:
        if train:
            rq, rk, rv = (t.detach().requires_grad_() for t in (q, k, v))
            ref_call = dataclasses.replace(call, query=rq, key=rk, value=rv)
            ref = reference_attention(ref_call)
            ref_grads = torch.autograd.grad(ref, (rq, rk, rv), g.to(device=device, dtype=ref.dtype))
        else:
            with torch.no_grad():
                ref = reference_attention(call)
    except RuntimeError as e:
        if _is_oom(e):
            ref = None  # too big to check: time only, and say so
            log.warning("autosdpa: reference too large to check %s; timing unchecked", tuned_shape)
        else:
            raise InvalidInputs(str(e)) from e

    tol = tolerance(call)
    fns = {}
    errors: dict[str, float | None] = {}
    for b in runnable:
        if train:
            def fn(b=b):  # autograd.grad returns the gradients without accumulating into xs
                out = b.run(xs[0], xs[1], xs[2], call.attn_mask, call.dropout_p, call.is_causal, call.scale,
                            call.enable_gqa)
                return out, torch.autograd.grad(out, xs, grad_out)
        else:
            def fn(b=b):
                with torch.no_grad():
                    return b.run(q, k, v, call.attn_mask, call.dropout_p, call.is_causal, call.scale,
                                 call.enable_gqa), ()
        try:
            out, grads = fn()
            err = None
            if ref is not None and call.dropout_p == 0:
                err = max_error(out, ref)
                for gr, rgr in zip(grads, ref_grads if train else ()):
                    err = max(err, max_error(gr, rgr) / GRAD_FACTOR)
                if not err <= tol:
                    results[b.name] = Measurement(
                        b.name, "rejected", max_error=None if math.isinf(err) else err, tuned_shape=tuned_shape,
                        detail=f"wrong result: error {err:.3g} vs reference exceeds tolerance {tol:.3g}")
                    continue
            elif call.dropout_p and not bool(torch.isfinite(out).all()):
                results[b.name] = Measurement(b.name, "rejected", detail="non-finite output",
                                              tuned_shape=tuned_shape)
                continue
            errors[b.name] = err
            fns[b.name] = fn
        except Exception as e:  # any failure only disqualifies this candidate
            detail = "out of memory" if _is_oom(e) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            results[b.name] = Measurement(b.name, "rejected", detail=detail[:500], tuned_shape=tuned_shape)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    del ref
    try:
        samples = time_interleaved(fns, device, budget_s=config.budget_s, min_rounds=config.min_rounds,
                                   max_rounds=config.max_rounds)
    except Exception as e:  # one candidate failing mid-timing: time the rest without it
        log.warning("autosdpa: timing failed (%s); retrying one by one", e)
        samples = {}
        for name, fn in fns.items():
            try:
                samples.update(time_interleaved({name: fn}, device, budget_s=config.budget_s / max(1, len(fns)),
                                                min_rounds=config.min_rounds, max_rounds=config.max_rounds))
            except Exception as e2:
                results[name] = Measurement(name, "rejected", detail=f"failed while timing: {e2}"[:500],
                                            tuned_shape=tuned_shape)
    for name, s in samples.items():
        med, spread = summarize(s)
        results[name] = Measurement(name, "ok", med, spread, len(s), errors.get(name),
                                    "" if errors.get(name) is not None or call.dropout_p == 0 else
                                    "dropout: output not compared", tuned_shape)
    return [results[b.name] for b in backends if b.name in results]


def choose(measurements: dict[str, Measurement], candidates: list[str], pytorch_choice: str | None
           ) -> tuple[str | None, str]:
    """(winner, reason) among ``candidates`` that measured ok; None when none did."""
    ok = {n: measurements[n] for n in candidates if n in measurements and measurements[n].ok}
    if not ok:
        return None, "no candidate has a passing measurement"
    best = min(ok, key=lambda n: ok[n].median_s)
    b = ok[best]
    if pytorch_choice in ok and pytorch_choice != best:
        d = ok[pytorch_choice]
        noise = max(TIE_TOLERANCE, (b.spread_s or 0) / b.median_s / 2, (d.spread_s or 0) / d.median_s / 2)
        if d.median_s <= b.median_s * (1 + noise):
            return pytorch_choice, (f"near-tie: PyTorch's choice {pytorch_choice} ({_fmt(d.median_s)}) is within "
                                    f"{noise:.0%} of {best} ({_fmt(b.median_s)})")
        return best, (f"fastest measured: {_fmt(b.median_s)}, {d.median_s / b.median_s:.2f}x faster than "
                      f"PyTorch's choice {pytorch_choice} ({_fmt(d.median_s)})")
    if best == pytorch_choice:
        return best, f"fastest measured ({_fmt(b.median_s)}), and PyTorch's own choice"
    return best, f"fastest measured ({_fmt(b.median_s)})"


def _fmt(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.3f} ms"
