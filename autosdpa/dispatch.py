"""The dispatcher: the per-call hot path, and the first-sight path that decides and remembers.

Hot path: one tuple of cheap call properties (shapes, dtype, device, mask kind, flags, grad, overrides) is
looked up in a dict. Its value is the *plan*: ``None`` means "PyTorch would pick the winner itself: call
F.sdpa directly" (no flag toggling); otherwise a function that runs the winner.
A miss builds the canonical ``Problem``, gets its measurements (memory, then the database layers, then
tuning on these very tensors) and caches the plan. Anything going wrong there falls back to F.sdpa.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import warnings

import torch
import torch.nn.functional as F

from . import backends as _backends
from . import consensus
from .backends.base import Backend, Call
from .backends.torch_backends import _GET as _FLAG_GETTERS, pytorch_choice
from .config import Settings
from .environment import environment
from .problem import DTYPE_NAMES, Problem
from .store import Measurement, Store, StoreError
from .tuner import Decision, InvalidInputs, TuneConfig, choose, measure

log = logging.getLogger("autosdpa")

_sdpa = F.scaled_dot_product_attention  # the original, even after autosdpa.patch()
_Tensor = torch.Tensor
_C = torch._C
_gf, _ge, _gm, _gc = _FLAG_GETTERS  # bound to module names: the hot path reads them on every call
# PyTorch before 2.6 has no priority order: a constant stands in, so "no priority order set" always holds.
_get_priority = getattr(_C, "_get_sdp_priority_order", lambda: [])
_DEFAULT_PRIORITY = list(_get_priority())
_det = _C._get_deterministic_algorithms
_is_compiling = torch.compiler.is_compiling

_MAX_PLANS = 4096
_INVALID = _backends.get("math")  # runs inputs the reference rejects, so that PyTorch raises its own error


class ForcedBackendError(RuntimeError):
    """``autosdpa.backend(...)`` named backends none of which can run these inputs."""


class _State:
    def __init__(self):
        self.settings = Settings.from_env()
        self.mode = self.settings.mode
        self.threshold = self.settings.bucket_threshold
        self.config = TuneConfig(budget_s=self.settings.budget_s)
        self.store: Store | None = None
        self.measurements: dict[tuple[str, str], dict[str, Measurement]] = {}
        self.seen_problems: set[str] = set()
        self.warned: set[str] = set()
        self.lock = threading.RLock()
        self.local = threading.local()  # .depth: re-entry from inside a backend, per thread


_plans: dict = {}
_control: tuple | None = None  # (mode or None, forced backend names or None); None = no override
_state = _State()


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` that runs the measured-fastest
    correct backend for these inputs on this device. Same arguments, same results, same exceptions."""
    # The fast key holds only what is cheap to read (~1 us for all of it). What it leaves out (value's
    # shape, k/v dtypes, strides, k/v requires_grad) cannot make a plan run something wrong: plans that are
    # not plain F.sdpa re-check what they depend on and fall back to F.sdpa.
    try:
        fk = (query.shape, key.shape, query.dtype, query.get_device(),
              None if attn_mask is None else (attn_mask.shape, attn_mask.dtype, attn_mask.__class__,
                                              attn_mask.requires_grad),
              dropout_p, is_causal, enable_gqa, query.requires_grad, _gf(), _ge(), _gm(), _gc(), _det(), _control)
        plan = _plans[fk]
    except KeyError:
        plan = _miss(fk, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    except Exception:  # inputs we cannot key (nested tensors, odd types): PyTorch handles (or rejects) them
        plan = None
    if plan is None:
        # Forward only what differs from the defaults: PyTorch's argument parsing costs ~0.25 us for the
        # explicit (None, 0.0, False) alone.
        if attn_mask is None and dropout_p == 0.0 and scale is None and enable_gqa is False:
            if is_causal is True:
                return _sdpa(query, key, value, is_causal=True)
            if is_causal is False:
                return _sdpa(query, key, value)
        return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    return plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _as_pytorch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


# Never tune while tracing: torch.compile sees plain F.sdpa in place of the dispatcher (no graph break, and no
# is_compiling() test on the eager hot path). PyTorch without substitute_in_graph gets that test instead.
try:
    torch.compiler.substitute_in_graph(scaled_dot_product_attention)(_as_pytorch)
except (AttributeError, TypeError):  # pragma: no cover - older PyTorch
    _dispatch_eager = scaled_dot_product_attention

    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False):
        if _is_compiling():
            return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        return _dispatch_eager(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

sdpa = scaled_dot_product_attention


# -- first sight ----------------------------------------------------------------------------------------------

def _miss(fk, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    st = _state
    local = st.local
    if getattr(local, "depth", 0):  # re-entered from inside a backend (CausalBias calls F.sdpa, maybe patched)
        return None
    local.depth = 1
    try:
        with st.lock:
            call = _make_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                              _needs_grad(query, key, value))
            if call is None:  # not cached: the fast key cannot tell these inputs from ordinary ones
                plan, cacheable = None, False
            else:
                decision, backend, cacheable = decide(call, fk[-1], fk[9:13], allow_tune=True)
                plan = _plan_for(backend, decision.pytorch_choice, call, forced=bool(fk[-1] and fk[-1][1]))
    except ForcedBackendError:
        raise
    except Exception as e:  # the cache or tuner misbehaving must never break the caller's run
        _warn_once("resolve", f"autosdpa: could not decide ({type(e).__name__}: {e}); using PyTorch's SDPA")
        log.debug("resolve failed", exc_info=True)
        plan, cacheable = None, True
    finally:
        local.depth = 0
    if cacheable:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        _plans[fk] = plan
    return plan


def _needs_grad(query, key, value) -> bool:
    return torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)


def _make_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, needs_grad) -> Call | None:
    """A Call for inputs autosdpa handles; None sends the call straight to F.sdpa (which may reject it)."""
    for t in (query, key, value):
        if type(t) is not _Tensor and type(t) is not torch.nn.Parameter:
            return None
        if t.is_nested or t.layout != torch.strided or t.dim() < 3:
            return None
    if attn_mask is not None and not isinstance(attn_mask, _Tensor):
        return None
    if (not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool)
            or not isinstance(dropout_p, (float, int)) or isinstance(dropout_p, bool)
            or not (scale is None or isinstance(scale, (float, int)) and not isinstance(scale, bool))):
        return None
    if query.device.type not in ("cpu", "cuda") or query.dtype not in DTYPE_NAMES:
        return None
    return Call(query, key, value, attn_mask, float(dropout_p), is_causal, scale, enable_gqa, bool(needs_grad))


def _tuning_forbidden(call: Call) -> str | None:
    if torch.compiler.is_compiling():
        return "inside torch.compile tracing"
    if call.query.is_cuda and torch.cuda.is_current_stream_capturing():
        return "during CUDA graph capture"
    return None


def eligibility(call: Call, backends: list[Backend] | None = None) -> dict[str, list[str]]:
    """{backend: reasons it cannot run this call}; an empty list means eligible."""
    out = {}
    m = call.dense_mask
    mask_grad = m is not None and m.requires_grad and torch.is_grad_enabled()
    for b in backends if backends is not None else _backends.all_backends():
        try:
            reasons = list(b.not_supported_reasons(call))
        except Exception as e:
            reasons = [f"eligibility check failed: {type(e).__name__}: {e}"]
        if not reasons:
            if call.needs_grad and not b.supports_grad:
                reasons = ["forward only: cannot compute gradients"]
            elif mask_grad and b.torch_backend is None:
                reasons = ["attn_mask requires grad: only PyTorch's backends compute the mask's gradient"]
        out[b.name] = reasons
    return out


def decide(call: Call, control: tuple | None, flags: tuple, *, allow_tune: bool
           ) -> tuple[Decision, Backend | None, bool]:
    """(decision, backend to run or None for plain F.sdpa, whether the outcome may be cached)."""
    st = _state
    mode = (control[0] if control and control[0] else None) or st.mode
    forced = control[1] if control else None
    if mode == "off":
        return Decision("pytorch", "autosdpa mode is 'off'", source="passthrough"), None, True
    problem = Problem.from_call(call, st.threshold)
    torch_pick = pytorch_choice(call)
    device = call.query.device
    everyone = [b for b in _backends.all_backends() if b.candidate_by_default(device)]
    if forced:
        candidates = [_backends.get(n) for n in forced]
        why = f"restricted by autosdpa.backend({', '.join(forced)})"
    elif list(_get_priority()) != _DEFAULT_PRIORITY:
        return (Decision(torch_pick or "pytorch", "a PyTorch priority order is set: PyTorch decides",
                         problem=problem.key, pytorch_choice=torch_pick, source="passthrough"), None, True)
    elif not all(flags):
        on = {name for name, slot in (("flash", 0), ("efficient", 1), ("math", 2), ("cudnn", 3)) if flags[slot]}
        candidates = [b for b in everyone if b.name in on]
        why = "restricted by PyTorch's sdpa flags (sdpa_kernel / enable_*_sdp)"
    else:
        candidates, why = everyone, ""
    elig = eligibility(call, list(dict.fromkeys(everyone + candidates)))
    rejected = {n: "; ".join(r) for n, r in elig.items() if r}
    eligible = [b for b in candidates if not elig[b.name]]
    if forced and not eligible:
        raise ForcedBackendError(
            "autosdpa.backend(" + ", ".join(map(repr, forced)) + ") cannot run these inputs: "
            + "; ".join(f"{n}: {rejected[n]}" for n in forced))
    if not eligible:  # e.g. flags left on only a backend that cannot run this: PyTorch raises its own error
        return (Decision(torch_pick or "pytorch", "no allowed backend can run these inputs: PyTorch decides",
                         rejected=rejected, problem=problem.key, pytorch_choice=torch_pick,
                         source="passthrough"), None, True)

    fp, info = environment(call.query.device)
    cache_key = (fp, problem.key)
    meas = st.measurements.get(cache_key)
    source = "cache"
    if meas is None:
        meas = _lookup(fp, problem.key)
        source = "database"
        st.measurements[cache_key] = meas
    _record(problem)
    cacheable = True
    missing = [b for b in eligible if b.name not in meas]
    if missing and len(eligible) > 1:
        forbidden = _tuning_forbidden(call)
        if mode != "tune" or not allow_tune or forbidden:
            cacheable = not forbidden
        else:
            to_time = [b for b in dict.fromkeys(everyone + candidates) if not elig[b.name]]
            log.info("autosdpa: tuning %s on %s (%s)", problem.key, info["device_name"],
                     ", ".join(b.name for b in to_time))
            try:
                with torch.random.fork_rng(devices=[call.query.device] if call.query.is_cuda else []):
                    new = measure(call, to_time, st.config, tuned_shape=_shape_str(call))
            except InvalidInputs as e:
                # Run PyTorch's math backend, which raises PyTorch's own error for such inputs. (F.sdpa's
                # default may not: torch 2.13's CPU flash kernel reads out of bounds when k and v lengths
                # differ and returns garbage instead of raising.)
                # Not cached: the fast key leaves out v's shape and k/v dtypes, which valid calls may fix.
                return (Decision("math", f"inputs rejected by the reference ({e}): PyTorch's math backend "
                                 "raises its error", problem=problem.key, pytorch_choice=torch_pick,
                                 source="invalid"), _INVALID, False)
            meas = {**meas, **{m.backend: m for m in new}}
            st.measurements[cache_key] = meas
            source = "tuned"
            if any(m.ok for m in new):
                # Failures (exceptions, out of memory, skipped for memory) may be passing trouble: kept in
                # memory for this process, not in the database. Wrong results are kept: that is evidence.
                _save(fp, info, problem.key, [m for m in new if m.ok or m.detail.startswith("wrong result")])

    for n, m in meas.items():
        if not m.ok and n not in rejected:
            rejected[n] = m.detail or m.status
    names = [b.name for b in eligible]
    if len(eligible) == 1:
        winner, reason = names[0], "the only allowed backend that can run these inputs"
        source = "forced" if forced else "only"
    else:
        winner, reason = choose(meas, names, torch_pick if torch_pick in names else None)
        if winner is None:
            winner = torch_pick if torch_pick in names else names[0]
            reason = ("no measurement yet (mode 'lookup' or tuning not allowed here): PyTorch's choice"
                      if not any(n in meas for n in names) else "no candidate passed its check: PyTorch's choice")
            source = "default"
        elif not forced and not why:
            agreed = consensus.agree(get_store(), fp, info, problem.key, winner, names)
            if agreed != winner:
                winner, reason, source = agreed, f"agreed with the other ranks (own pick: {winner})", "agreed"
    if why:
        reason = f"{reason}; {why}"
    timings = {n: (meas[n].median_s if n in meas and meas[n].ok else None) for n in elig}
    decision = Decision(winner, reason, timings, rejected, problem.key, torch_pick, source)
    return decision, _backends.get(winner), cacheable


def _plan_for(backend: Backend | None, torch_pick: str | None, call: Call, forced: bool = False):
    if backend is _INVALID:
        return _INVALID.run  # no fallback to F.sdpa: its error (not a silent wrong result) is the answer
    if backend is None or backend.name == torch_pick:
        return None
    run = backend.run
    if backend.torch_backend is not None:
        def plan(q, k, v, m, dp, ic, sc, gqa):
            if _get_priority() != _DEFAULT_PRIORITY:  # a priority order set since: PyTorch decides
                return _sdpa(q, k, v, m, dp, ic, scale=sc, enable_gqa=gqa)
            try:
                return run(q, k, v, m, dp, ic, sc, gqa)
            except RuntimeError:  # e.g. strides the plan was not made for: PyTorch's own pick (or error)
                if forced:  # autosdpa.backend(...) means exactly that backend: its error is the answer
                    raise
                return _sdpa(q, k, v, m, dp, ic, scale=sc, enable_gqa=gqa)
        return plan

    v_shape, needs_grad, fwd_only = call.value.shape, call.needs_grad, not backend.supports_grad

    def guarded(q, k, v, m, dp, ic, sc, gqa):
        # The fast key covers q (and k's shape) only: re-check what our kernels need of k and v.
        qd, dt = q.get_device(), q.dtype
        if (q.__class__ is _Tensor and k.__class__ is _Tensor and v.__class__ is _Tensor and k.dtype is dt
                and v.dtype is dt and k.get_device() == qd and v.get_device() == qd and v.shape == v_shape
                and (m is None or m.get_device() == qd)
                and (needs_grad or not fwd_only or not _needs_grad(q, k, v))):
            return run(q, k, v, m, dp, ic, sc, gqa)
        return _sdpa(q, k, v, m, dp, ic, scale=sc, enable_gqa=gqa)
    return guarded


def _shape_str(call: Call) -> str:
    s = f"q={tuple(call.query.shape)} k={tuple(call.key.shape)} v={tuple(call.value.shape)}"
    if call.dense_mask is not None:
        s += f" mask={tuple(call.dense_mask.shape)}"
    return s


# -- storage, never fatal -------------------------------------------------------------------------------------

def get_store() -> Store:
    st = _state
    if st.store is None:
        try:
            st.store = Store(_state.settings.db, shared=list(_state.settings.all_shared_dbs()))
        except Exception as e:  # StoreError, or OSError/ImportError from an odd location or URL
            _fallback_store(e)
    return st.store


def _fallback_store(err: Exception) -> None:
    _warn_once("store", f"autosdpa: tuning database unusable ({err}); keeping measurements in memory for "
                        "this process only")
    shared = _state.store.shared if _state.store is not None else []
    st = Store("sqlite://")
    st.shared = shared
    _state.store = st


def _lookup(fp: str, key: str) -> dict[str, Measurement]:
    try:
        return get_store().lookup(fp, key)
    except StoreError as e:
        _fallback_store(e)
        return {}


def _save(fp: str, info: dict, key: str, rows: list[Measurement]) -> None:
    try:
        get_store().save(fp, info, key, rows)
    except StoreError as e:
        _fallback_store(e)
        try:
            _state.store.save(fp, info, key, rows)
        except StoreError:
            pass


def _record(problem: Problem) -> None:
    path = _state.settings.record
    if not path or problem.key in _state.seen_problems:
        return
    _state.seen_problems.add(problem.key)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"problem": problem.key, "time": time.time()}) + "\n")
    except OSError as e:
        _warn_once("record", f"autosdpa: cannot append to AUTOSDPA_RECORD={path}: {e}")


def _warn_once(kind: str, message: str) -> None:
    if kind not in _state.warned:
        _state.warned.add(kind)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def clear_plans() -> None:
    _plans.clear()


def reset() -> None:
    """Forget everything in memory and re-read the environment (AUTOSDPA_*): for tests and notebooks."""
    global _state
    if _state.store is not None:
        try:
            _state.store.close()
        except Exception:
            pass
    _plans.clear()
    _state = _State()


_backends.base.on_change(clear_plans)
