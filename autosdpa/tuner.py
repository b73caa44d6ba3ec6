"""First-sight tuning: check every eligible backend against one shared reference, time the survivors side by
side within a hard time budget, and pick the winner (near-ties go to PyTorch's own choice, so decisions are
stable).

The budget (``TuneConfig.budget_s``) caps the whole of ``measure()`` -- reference, checks, warm-up, timing --
on the timer's clock. A timing round starts only if its estimated cost fits before the deadline. After the
deadline each candidate starts at most one more call: its checked first call if it has none yet (every
candidate gets that: it is the evidence that it is right), else one timing sample if it has none yet (not when
its first call alone was over the budget, or clearly slower than a sampled candidate: then that first call is
its one sample). So ``measure()`` returns by the budget plus the call running at the deadline plus at most one
call (or one ~``cpu_sample_s`` sample) per candidate, and a call bigger than the budget gets 1-3 samples.
PyTorch's pick is checked first, so a late candidate can only be overstated by a first call's start-up
costs, never the baseline.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch
from torch import Tensor

from . import forms, memory
from .backends.base import Backend, Call, safe_runner
from .backends.torch_backends import pytorch_choice as _pytorch_choice
from .checks import Check, InvalidInputs, is_oom, reference_bytes
from .rounds import Rounds, run_rounds
from .store import Measurement
from .timing import CPU_SAMPLE_S, Timer, summarize, timer_for

log = logging.getLogger("autosdpa")

TIE_TOLERANCE = 0.03  # at least 3%: below that, a "win" is usually noise between runs

__all__ = ["Decision", "InvalidInputs", "TIE_TOLERANCE", "TuneConfig", "choose", "measure"]

_FROM_CALL = object()  # measure(pytorch_choice=...) default: ask PyTorch for this call


@dataclasses.dataclass
class TuneConfig:
    budget_s: float = 1.0          # hard cap on all of measure(): reference, checks, warm-up and timing
    memory_fraction: float = 0.8   # of free device memory a candidate may need
    min_rounds: int = 3            # samples each before the ranking may be called settled
    max_rounds: int = 50
    stable_rounds: int = 3         # settled: the same winner over this many rounds (and clear of the noise)
    dominance: float = 2.0         # after two samples, a candidate this many times slower than the best stops
    cpu_sample_s: float = CPU_SAMPLE_S  # CPU: repetitions per sample sized to about this long
    # A first call is "too slow" (skipped, not timed) only beyond the budget, ``dominance`` x the fastest first
    # call, and this: first calls carry lazy initialisation, and a busy CPU makes small ones ~100 ms.
    too_slow_s: float = 1.0
    timer: Callable[[torch.device], Timer] | None = None  # makes the timer for a device (tests: fake clocks)

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
    source: str = ""  # tuned | cache | database | default | forced | only | agreed | invalid | passthrough

    def __str__(self) -> str:
        return f"{self.backend}: {self.reason}"


def measure(call: Call, backends: list[Backend], config: TuneConfig | None = None, tuned_shape: str = "", *,
            finish: Callable[[Tensor, str], Tensor] | None = None, timer: Timer | None = None,
            pytorch_choice: str | None | object = _FROM_CALL) -> list[Measurement]:
    """Check and time ``backends`` (all already eligible) on ``call``: one Measurement each, in their order.

    - Correctness: each candidate's first call is compared with one reference shared by all (a part of the
      call when the whole is large, see ``checks``). Wrong, non-finite, raising or out-of-memory candidates
      are ``rejected`` with the reason in ``detail``; on CUDA the allocator cache is emptied after a failure.
    - Budget: ``config.budget_s`` is a hard cap on all of it, with the overshoot bound in the module's notes.
    - A candidate whose first call took longer than the whole budget, ``config.too_slow_s`` and
      ``config.dominance`` x the fastest first call is ``skipped`` ("too slow: ..."), not timed further.
    - Timing stops early once the ranking is settled (see ``rounds``); a candidate clearly slower than the
      leader after its first call and one or two samples stops being timed and keeps an ``ok`` row with them.
    - ``finish(out, backend_name)`` is applied to each candidate's output inside the timed call (it is part
      of what the user pays) and before the comparison; ``timer`` defaults to ``config.timer(device)``, else
      the device's own (``timing``).
    - ``pytorch_choice``: the backend PyTorch would pick (near-ties go to it); by default asked of PyTorch.
    - Candidates whose workspace does not fit ``config.memory_fraction`` of free device memory: ``skipped``.
    - Raises InvalidInputs when the reference rejects the inputs. KeyboardInterrupt (and any other
      BaseException) propagates at once; no candidate is retried.
    - The dispatcher never calls this with degenerate inputs (scale 0, empty tensors); empty inputs give
      ``skipped`` rows all the same.
    """
    config = config or TuneConfig()
    if timer is None:
        dev = call.query.device
        timer = config.timer(dev) if config.timer is not None else timer_for(dev, config.cpu_sample_s)
    deadline = timer.now() + config.budget_s
    rows: dict[str, Measurement] = {}
    if any(t.numel() == 0 for t in (call.query, call.key, call.value)):
        return [Measurement(b.name, "skipped", detail="empty input: nothing to check or time",
                            tuned_shape=tuned_shape) for b in backends]
    runnable = _fit_memory(call, backends, config, rows, tuned_shape)
    if pytorch_choice is _FROM_CALL:
        try:
            pytorch_choice = _pytorch_choice(call)
        except Exception:  # only a tie-breaker: never a reason to fail the tuning
            pytorch_choice = None
    # PyTorch's pick goes first: it is the baseline and keeps near-ties, so it must be checked and sampled
    # within the budget; a late candidate can only be overstated by its first call, i.e. lose to it.
    runnable.sort(key=lambda b: b.name != pytorch_choice)
    q, k, v, xs, grad_out = _inputs(call)
    check = Check(call, grad_out)
    fns = {b.name: _timed_fn(b, call, (q, k, v), xs, grad_out, finish) for b in runnable}
    first, errors, late = _check_all(fns, check, timer, deadline, rows, tuned_shape)
    unchecked = check.unchecked
    if unchecked and check.pieces is None:
        log.warning("autosdpa: reference too large to check %s; timing unchecked", tuned_shape)
    del check  # the reference's memory goes before the timing
    _skip_too_slow(first, config, rows, tuned_shape)
    fns = {n: fns[n] for n in first if n not in rows}
    prefer = pytorch_choice if pytorch_choice in fns else None
    res = run_rounds(fns, first, timer, deadline, config, lambda s: _leader(s, prefer), prefer, _describe, late)
    _timed_rows(res, first, errors, unchecked, rows, tuned_shape)
    if call.query.is_cuda and res.failed:
        torch.cuda.empty_cache()
    log.debug("autosdpa: measured %s: %s after %s", tuned_shape, res.stopped, {n: len(s) for n, s in res.samples.items()})
    return [rows[b.name] for b in backends if b.name in rows]


def _free_bytes(device: torch.device) -> int | None:
    return memory.free_bytes(device)


def _fit_memory(call: Call, backends: list[Backend], config: TuneConfig, rows: dict[str, Measurement],
                tuned_shape: str) -> list[Backend]:
    """The backends whose checked first call fits ``config.memory_fraction`` of the free memory; the others get
    a ``skipped`` row saying what they would need. What a first call needs: the inputs' copies that take
    gradients and the upstream gradient (made once), the reference the checker keeps (or computes: the
    larger), and the candidate's own workspace, output and gradients."""
    free = _free_bytes(call.query.device)
    if free is None:
        return list(backends)
    try:
        setup = memory.setup_bytes(call)
        ref_peak, ref_kept = reference_bytes(call)
        if ref_peak > memory.MEMORY_FRACTION * (free - setup):  # Check will not compute it (and says so)
            ref_peak = ref_kept = 0
        needs = {b.name: setup + max(ref_peak, ref_kept + b.workspace_bytes(call) + memory.io_bytes(call))
                 for b in backends}
    except Exception:  # an input the estimates do not know: they are a safeguard, never a reason to fail
        log.debug("autosdpa: no memory estimate for %s", tuned_shape, exc_info=True)
        return list(backends)
    runnable = []
    for b in backends:
        need = needs[b.name]
        if need > config.memory_fraction * free:
            rows[b.name] = Measurement(b.name, "skipped", tuned_shape=tuned_shape, detail=(
                f"needs ~{memory.fmt_bytes(need)}, {memory.fmt_bytes(free)} free: not run (tuning uses at most "
                f"{config.memory_fraction:.0%} of the free memory)"))
        else:
            runnable.append(b)
    return runnable


def _inputs(call: Call):
    """(q, k, v detached; the inputs that need grad and one upstream gradient when training, else None)."""
    q, k, v = (t.detach() for t in (call.query, call.key, call.value))
    if not call.needs_grad:
        return q, k, v, None, None
    # F.sdpa's output has q's shape with v's last dim; autograd.grad returns gradients without accumulating.
    g = forms.form_of(call).random_output(call)
    xs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    return q, k, v, xs, g.to(device=q.device, dtype=q.dtype)


def _timed_fn(b: Backend, call: Call, qkv, xs, grad_out, finish) -> Callable[[], tuple[Tensor, tuple]]:
    """One call of ``b`` as the user pays it: its runner for these inputs (what a plan runs), finish (layout
    copy), and backward when training."""
    rest = (call.attn_mask, call.dropout_p, call.is_causal, call.scale, call.enable_gqa)
    name, run = b.name, safe_runner(b, Call(*(xs or qkv), *rest, needs_grad=xs is not None))
    if xs is not None:
        def fn():
            out = run(*xs, *rest)
            if finish is not None:
                out = finish(out, name)
            return out, torch.autograd.grad(out, xs, grad_out)
        return fn
    q, k, v = qkv

    def fn():
        with torch.no_grad():
            out = run(q, k, v, *rest)
            return (out if finish is None else finish(out, name)), ()
    return fn


def _describe(e: Exception) -> str:
    if is_oom(e):
        return "out of memory"
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"  # its first line, whole: a reason is never cut


def _check_all(fns, check: Check, timer: Timer, deadline: float, rows: dict[str, Measurement], tuned_shape: str
               ) -> tuple[dict[str, float], dict[str, float | None], frozenset[str]]:
    """Run each candidate once and judge it: ({passed: seconds of that first call}, {passed: max error},
    {those checked after the deadline}). Every candidate gets this call even past the budget: it is the
    evidence that it is right."""
    first: dict[str, float] = {}
    errors: dict[str, float | None] = {}
    late = set()
    cuda = check.call.query.is_cuda
    for name, fn in fns.items():
        try:
            t0 = timer.now()
            if t0 >= deadline:
                late.add(name)
            out, grads = fn()
            timer.sync()
            seconds = timer.now() - t0
            err, reason = check.judge(out, grads)
        except Exception as e:  # any failure only disqualifies this candidate
            reason, err = _describe(e), None
        out = grads = None  # a failed candidate's memory goes before the next one runs
        if reason is not None:
            rows[name] = Measurement(name, "rejected", max_error=err, detail=reason, tuned_shape=tuned_shape)
            if cuda:
                torch.cuda.empty_cache()
            continue
        first[name], errors[name] = max(seconds, 1e-9), err
    return first, errors, frozenset(late)


def _skip_too_slow(first: dict[str, float], config: TuneConfig, rows: dict[str, Measurement], tuned_shape: str
                   ) -> None:
    """A first call longer than the whole budget and ``too_slow_s``, and over ``dominance`` x another
    candidate's: not timed. On a GPU this is often a cold compile; a later process finds it cached."""
    if not first:
        return
    fastest = min(first.values())
    for name, s in first.items():
        if s > max(config.budget_s, config.too_slow_s) and s > config.dominance * fastest:
            rows[name] = Measurement(name, "skipped", tuned_shape=tuned_shape, detail=(
                f"too slow: its first call took {_fmt(s)}, more than the whole tuning budget ({_fmt(config.budget_s)}) "
                f"and {s / fastest:.1f}x the fastest candidate's first call; not timed"))


def _leader(samples: dict[str, list[float]], prefer: str | None) -> str | None:
    """choose()'s answer on the samples so far."""
    meas = {}
    for n, s in samples.items():
        med, spread = summarize(s)
        meas[n] = Measurement(n, "ok", max(med, 1e-9), spread, len(s))
    return choose(meas, list(meas), prefer if prefer in meas else None)[0]


def _timed_rows(res: Rounds, first: dict[str, float], errors: dict[str, float | None], unchecked: str | None,
                rows: dict[str, Measurement], tuned_shape: str) -> None:
    for name in first:
        if name in rows:
            continue
        if name in res.failed:
            rows[name] = Measurement(name, "rejected", detail=res.failed[name], tuned_shape=tuned_shape)
            continue
        notes = [res.notes[name]] if name in res.notes else []
        samples = res.samples.get(name) or []
        if not samples:  # the budget ran out (see rounds._last_samples): its first call is its one sample
            samples = [res.est.get(name, first[name])]
            notes.append("one sample: its first call (tuning budget spent)")
        if unchecked:
            notes.append(unchecked)
        med, spread = summarize(samples)
        med = max(med, 1e-9)  # an ok row needs a positive time; a coarse or fake clock can read 0
        rows[name] = Measurement(name, "ok", med, spread, len(samples), errors.get(name), "; ".join(notes),
                                 tuned_shape)


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
