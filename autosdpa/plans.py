"""Plans: what a cache hit runs. ``None`` (not a Plan) means "call F.sdpa": PyTorch's own pick is the winner.

A plan for any other winner holds one fast key (exact shapes). Once per memory layout of the actual tensors
(the fast key holds shapes, not strides or k/v dtypes) it checks that its backend can run them and asks the
backend for a runner set up for that layout, which skips the per-call checks; it returns the output in the
layout PyTorch's own pick would give. It never touches PyTorch's process-wide flags.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwAD
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias

from .autocast import autocast_inputs
from .backends import torch_backends
from .backends.torch_layout import output_strides, restride
from .backends.base import Backend, safe_runner
from .forms import make_call
from .eligibility import ForcedBackendError, eligibility, reasons_text
from .forms.structure import StructuredMask, detect, trusted

_sdpa = F.scaled_dot_product_attention
_capturing = torch.cuda.is_current_stream_capturing
_is_tracing = torch._C._is_tracing  # what torch.jit.is_tracing asks outside TorchScript, minus a Python frame
_grad_enabled = torch.is_grad_enabled
_MAX_LAYOUTS = 64
_INF = float("inf")
# PyTorch before 2.6 has no priority order: a constant stands in, so "no priority order set" always holds.
_get_priority = getattr(torch._C, "_get_sdp_priority_order", lambda: [])
_DEFAULT_PRIORITY = _get_priority()


def priority_set() -> bool:
    """Whether the user set a PyTorch priority order (``sdpa_kernel(..., set_priority=True)``)."""
    return _get_priority() != _DEFAULT_PRIORITY


def _is_autocast(device_type: str) -> bool:
    return torch.is_autocast_enabled(device_type)


# one call for every device type (torch >= 2.4); the precise per-device check follows only when it says yes
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


_HAS_FWAD_LEVEL = hasattr(_fwAD, "_current_level")


def _forward_ad() -> bool:
    """Whether a forward-mode AD level is open: backends differ in supporting it (CPU flash raises), so F.sdpa
    decides, and raises or not as it would."""
    return _HAS_FWAD_LEVEL and _fwAD._current_level >= 0


def _mask_layout(m):
    if type(m) is CausalBias:
        return (m.variant, m.seq_len_q, m.seq_len_kv)
    return (m.stride(), m.device, m.dtype)


class Plan:
    """Runs ``backend`` for calls of one fast key."""

    __slots__ = ("backend", "forced", "_layouts")

    def __init__(self, backend: Backend, forced: bool):
        self.backend, self.forced = backend, forced
        # layout signature -> (the backend's runner for it, or None: F.sdpa; output strides to restride to or None)
        self._layouts: dict = {}

    def __call__(self, q, k, v, m, dp, ic, sc, gqa):
        if _is_tracing() or _any_autocast() or not (self.forced or (
                (sc is None or 0.0 < sc < _INF) and _get_priority() == _DEFAULT_PRIORITY and not _forward_ad())):
            return self._special(q, k, v, m, dp, ic, sc, gqa)
        return self._run(q, k, v, m, dp, ic, sc, gqa)

    def _special(self, q, k, v, m, dp, ic, sc, gqa):
        if _is_tracing():  # torch.jit.trace records what runs: PyTorch's own op, as F.sdpa would
            return _sdpa(q, k, v, m, dp, ic, scale=sc, enable_gqa=gqa)
        autocast = _is_autocast(q.device.type)
        if not self.forced and (autocast or not (sc is None or 0.0 < sc < _INF) or priority_set() or _forward_ad()):
            # autocast casts F.sdpa's inputs (the plan was tuned for the uncast dtype); a degenerate scale must
            # give what F.sdpa gives; a priority order set since this plan was made means PyTorch decides; so
            # does forward-mode AD
            return _sdpa(q, k, v, m, dp, ic, scale=sc, enable_gqa=gqa)
        if autocast:  # a forced backend runs on what autocast would hand F.sdpa
            q, k, v, m = autocast_inputs(q.device.type, q, k, v, m)
        return self._run(q, k, v, m, dp, ic, sc, gqa)

    def _run(self, q, k, v, m, dp, ic, sc, gqa):
        # calls.needs_grad inlined in the last item: one Python frame less per call
        sig = (q.stride(), k.stride(), v.stride(), k.dtype, v.dtype, k.device, v.device,
               None if m is None else _mask_layout(m),
               _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
        verdict = self._layouts.get(sig)
        if verdict is None:
            verdict = self._check(sig, q, k, v, m, dp, ic, sc, gqa)
        run, order = verdict
        if run is None or (q.is_cuda and _capturing() and not self._ready(q, k, v, m, dp, ic, sc, gqa)):
            return _sdpa(q, k, v, m, dp, ic, scale=sc, enable_gqa=gqa)
        out = run(q, k, v, m, dp, ic, sc, gqa)
        return out if order is None else restride(out, order)

    def sibling(self) -> "Plan":
        """The same choice for other shapes of its bucket: layouts are checked again (eligibility and the
        backend's own checks depend on exact shapes, and a view of a KV cache keeps its strides)."""
        return Plan(self.backend, self.forced)

    def _check(self, sig, q, k, v, m, dp, ic, sc, gqa):
        if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
            verdict = (None, None)  # invalid for every backend: F.sdpa raises PyTorch's own error
        else:
            call = make_call(q, k, v, m, dp, ic, sc, gqa)
            reasons = ["inputs autosdpa does not key"] if call is None else eligibility(call, [self.backend])[
                self.backend.name]
            if reasons and self.forced:
                raise ForcedBackendError.for_names([self.backend.name], {self.backend.name: "; ".join(reasons)})
            verdict = (None, None) if reasons else (safe_runner(self.backend, call), self._order(call))
        if len(self._layouts) >= _MAX_LAYOUTS:
            self._layouts.clear()
        self._layouts[sig] = verdict
        return verdict

    def _order(self, call):
        """The dim order PyTorch's own pick gives its output (None: the backend's own output already has it)."""
        if call.query.is_nested:  # the njt_* backends build F.sdpa's NJT structure themselves
            return None
        pick = torch_backends.pytorch_choice(call)
        if pick is None:  # F.sdpa would raise or run nothing here: the backend's own layout
            return None
        want = output_strides(call, pick)
        if self.backend.torch_backend is not None and want == output_strides(call, self.backend.name):
            return None
        return want  # restride() returns the output itself when it already has these strides

    def _ready(self, q, k, v, m, dp, ic, sc, gqa) -> bool:
        """During CUDA-graph capture nothing may compile or autotune: only a kernel already built runs."""
        ready = getattr(self.backend, "ready", None)
        return ready is None or bool(ready(make_call(q, k, v, m, dp, ic, sc, gqa)))


class Router:
    """What a cache hit runs for a masked call whose mask may have a structure (``forms.structure``): per call,
    the structure (a ``StructuredMask`` says it; a dense CPU mask is read and checked on all of its values,
    so the verdict is never stale), then the plan decided for that structure (``route``: the dispatcher's,
    once per structure and share of valid keys), run with the structure trusted for this call. A fast key whose
    dense masks showed no structure ``GIVE_UP`` times in a row is handed back to the dispatcher (``give_up``),
    which caches its plain plan instead: a model with arbitrary masks pays the O(Lk) look only at first."""

    GIVE_UP = 3
    __slots__ = ("fk", "routes", "_route", "_give_up", "_misses")

    def __init__(self, fk: tuple, route, give_up):
        self.fk, self._route, self._give_up = fk, route, give_up
        self.routes: dict = {}  # (word, fill) or None -> plan (None: F.sdpa)
        self._misses = 0

    def __call__(self, q, k, v, m, dp, ic, sc, gqa):
        if m.__class__ is StructuredMask:
            s, m = m.structure, m.materialize(q.device)
        else:
            s = detect(m, q, k)
        key = None if s is None else (s.word, s.fill)
        plan = self.routes.get(key, _ABSENT)
        if plan is _ABSENT:
            plan = self._route(self, key, s, q, k, v, m, dp, ic, sc, gqa)
        if s is None and self.routes.keys() <= {None}:  # no structure seen yet under this key
            self._misses += 1
            if self._misses == self.GIVE_UP:
                self._give_up(self, plan)
        if plan is None:
            return _sdpa(q, k, v, m, dp, ic, scale=sc, enable_gqa=gqa)
        with trusted(m, s):
            return plan(q, k, v, m, dp, ic, sc, gqa)

    def sibling(self, fk: tuple) -> "Router":
        """The same routes for another fast key of its bucket (plans re-check each new layout)."""
        other = Router(fk, self._route, self._give_up)
        other.routes = {key: p.sibling() if isinstance(p, Plan) else p for key, p in self.routes.items()}
        return other


_ABSENT = object()


class InvalidPlan:
    """Inputs PyTorch must reject: run its math backend, which raises PyTorch's own error (F.sdpa's CPU flash
    kernel would instead read past v when k and v lengths differ and return garbage)."""

    __slots__ = ("math",)

    def __init__(self, math_backend: Backend):
        self.math = math_backend

    def __call__(self, q, k, v, m, dp, ic, sc, gqa):
        if _is_autocast(q.device.type):  # what autocast would hand F.sdpa's op
            q, k, v, m = autocast_inputs(q.device.type, q, k, v, m)
        return self.math.run(q, k, v, m, dp, ic, sc, gqa)


def plan_for(backend: Backend | None, pytorch_choice: str | None, forced: bool) -> Plan | None:
    if backend is None or (backend.name == pytorch_choice and not forced):
        return None
    return Plan(backend, forced)


__all__ = ["Plan", "InvalidPlan", "Router", "plan_for", "reasons_text"]
