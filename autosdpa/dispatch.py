"""The dispatcher: the per-call hot path, and the first-sight path that decides and remembers.

Hot path: a tuple of cheap call properties (the *fast key*: shapes, dtype, device, mask kind, flags, grad,
overrides) is looked up in a dict. Its value is the *plan*: ``None`` means "call F.sdpa directly" (PyTorch's
own pick won, or PyTorch decides); otherwise a ``plans.Plan`` that runs the winner. Where the C extension is
built, a hit runs in C (``fastkey``); a miss comes back to the Python path, which does the same in Python.

A miss goes through the layers in order (DESIGN §1), each in its own function:
``policy.resolve`` (overrides) -> ``eligibility`` (these tensors) -> measurements (memory, then the user's
database, then the read-only shared layers, then tuning) -> ``choose`` (+ claims checked, + rank consensus).
The ``Dispatcher`` object owns all of this state; other modules change it only through its methods.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time

import torch
import torch.nn.functional as F

from . import backends as _backends
from . import compiled, consensus, fastkey, forms, warm
from .autocast import autocast_inputs
from .backends.base import Backend, Call
from .backends.torch_backends import torch_flags
from .backends.torch_layout import output_strides, restride
from .claims import check_claim
from .config import Settings, configure_logging
from .eligibility import ForcedBackendError, eligibility, reasons_text
from .environment import environment
from .forms.structure import candidate_shape, detect, trusted
from .masks import StructuredMask
from .plans import InvalidPlan, Plan, Router, plan_for, priority_set
from .policy import NO_OVERRIDES, Overrides, Policy, resolve
from .problem import Problem
from .store import Measurement, Store, StoreError
from .text import warn_at_caller
from .tuner import Decision, InvalidInputs, TuneConfig, choose, measure

log = logging.getLogger("autosdpa")

_sdpa = pytorch_sdpa = F.scaled_dot_product_attention  # the original, even after autosdpa.patch()
_C = torch._C
_tracing = _C._is_tracing  # torch.jit.is_tracing outside TorchScript, minus a Python frame
_key = fastkey.key_function()           # the fast key: C when built (fastkey), set again by configure()
_hit = None                             # the C cache-hit path (fastkey.hit_function), set by configure()
_ABSENT = object()                      # "no plan cached for this key"

_MAX_PLANS = 4096
_plans: dict = {}                       # fast key -> plan (None: F.sdpa)
_bucket_plans: dict = {}                # bucket key -> plan: a new length in a known bucket decides nothing
_overrides: Overrides = NO_OVERRIDES    # autosdpa.backend(...) / mode(...) in force
_override_sets: list[tuple] = [(NO_OVERRIDES.mode, NO_OVERRIDES.backends)]  # fast-key code -> (mode, backends)
_overrides_key: int = 0                 # the code of the overrides in force: a small int hashes fastest
_last: tuple = ((), None)               # the last fast key found and its plan: a model's layers mostly repeat it,
                                        # and comparing with it skips hashing the key
_FK_FLAGS = slice(10, 14)               # where the fast key holds PyTorch's four sdp flags
_FK_OVERRIDES = 15


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` that runs the measured-fastest
    correct backend for these inputs on this device. Same arguments, same results, same exceptions."""
    global _last
    fk = ()
    if _hit is not None:  # the C hit path: the output, or on a miss the key (() where it could build none)
        fk = _hit(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, _overrides_key)
        if fk.__class__ is not tuple:
            return fk
    plan = _ABSENT  # a key from C was just looked up and is not cached: decide
    if not fk:  # no C path, or C could not key these inputs: the same lookup in Python
        try:
            fk = _key(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, _overrides_key)
            last = _last
            if fk == last[0]:
                plan = last[1]
            else:
                plan = _plans.get(fk, _ABSENT)
                if plan is not _ABSENT:
                    # only keys found in _plans: a plan not cached must not be reused. (A clear_plans() from
                    # another thread between the lookup and this line leaves the older plan here until the next
                    # other key.)
                    _last = (fk, plan)
        except Exception:  # inputs we cannot key (nested tensors, odd types): PyTorch handles (or rejects) them
            plan = None
    if plan is _ABSENT:
        plan = dispatcher.miss(fk, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
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


sdpa = scaled_dot_product_attention


#: Attention work (Lq x Lk) below which a dense mask's structure is not looked for: a rewrite could save less
#: than the look costs.
STRUCTURE_MIN_WORK = 4096


def _may_have_structure(call: Call, m) -> bool:
    """Whether this call's mask may have a structure worth a rewrite: a StructuredMask says so; a dense one
    must be readable here (CPU), one for every head, and the call big enough."""
    if m.__class__ is StructuredMask:
        return True
    q, k = call.query, call.key
    return (call.structure is None and not call.is_causal and call.dropout_p == 0 and call.form == "dense"
            and candidate_shape(m, q, k) is not None and q.shape[2] * k.shape[2] >= STRUCTURE_MIN_WORK)


def _tuning_forbidden(call: Call) -> str | None:
    if torch.compiler.is_compiling():
        return "inside torch.compile tracing"
    if call.query.is_cuda and torch.cuda.is_current_stream_capturing():
        return "during CUDA graph capture"
    return None


def _shape_str(call: Call) -> str:
    s = f"q={tuple(call.query.shape)} k={tuple(call.key.shape)} v={tuple(call.value.shape)}"
    if call.dense_mask is not None:
        s += f" mask={tuple(call.dense_mask.shape)}"
    return s


def _finisher(call: Call, pick: str | None):
    """What turns each candidate's output into the layout PyTorch's own pick gives (timed with it); None for
    jagged calls (their backends build F.sdpa's NestedTensor themselves) or no pick."""
    if pick is None or call.form == "jagged":
        return None
    want = output_strides(call, pick)
    return lambda out, name: restride(out, want)  # ``out`` itself when it already has that layout


def _env_kind(b: Backend) -> str:
    """Rows of backends made of PyTorch's ops do not depend on Triton or our kernels; rows of our kernels do."""
    return "kernels" if b.uses_kernels else "torch"


class Dispatcher:
    """Owns the dispatcher's state: settings, the open store and its layers, measurements in memory, plans,
    overrides, warnings already given. One instance per process (``dispatcher``)."""

    def __init__(self, settings: Settings | None = None):
        self._lock = threading.RLock()  # one decision at a time: each new problem is tuned once
        self._generation = 0  # bumped whenever the plans are cleared
        self._local = threading.local()  # .busy: re-entry from inside a backend, per thread
        self._store: Store | None = None
        self._apply(settings or Settings.from_env())

    # -- state ---------------------------------------------------------------------------------------------
    def _apply(self, settings: Settings) -> None:
        global _key, _hit
        self.settings = settings
        _key = fastkey.key_function(settings.native)
        _hit = fastkey.hit_function(_plans, _sdpa, settings.native)
        self.config = TuneConfig(budget_s=settings.budget_s)
        self._memory: dict[tuple, dict[str, Measurement]] = {}  # (fingerprints, key) -> {backend: row}
        self._claims: dict[tuple, set[str]] = {}    # rows from shared layers, not yet checked in this process
        self._recorded: set[str] = set()
        self._warned: set[str] = set()
        self.clear_plans()
        configure_logging(settings.log_level)

    def configure(self, settings: Settings) -> None:
        """Use ``settings`` from now on: the store is reopened, in-memory caches and plans are dropped."""
        with self._lock:
            self._close_store()
            self._apply(settings)

    def reset(self) -> None:
        """Forget everything in memory and re-read the environment (AUTOSDPA_*)."""
        self.configure(Settings.from_env())

    @property
    def overrides(self) -> Overrides:
        return _overrides

    def set_overrides(self, overrides: Overrides) -> None:
        global _overrides, _overrides_key
        # part of the fast key: plans made under other overrides stay valid
        value = (overrides.mode, overrides.backends)
        if value not in _override_sets:
            _override_sets.append(value)
        _overrides, _overrides_key = overrides, _override_sets.index(value)

    def clear_plans(self) -> None:
        with self._lock:
            self._generation += 1  # a decision still running in another thread must not cache its plan
            self._clear_plans()

    def _clear_plans(self) -> None:
        global _last
        _last = ((), None)
        fastkey.forget()
        _plans.clear()
        _bucket_plans.clear()

    def measured_problems(self) -> dict[str, list[str]]:
        """{problem key: backends with a row} for what this process looked up or measured (diagnostics)."""
        return {key[-1]: sorted(rows) for key, rows in self._memory.items()}

    def cached_plans(self) -> list:
        """The plans cached for the hot path (None: plain F.sdpa), for tests and diagnostics."""
        return list(_plans.values())

    def store(self) -> Store:
        """The user's database with its read-only layers; an unusable one falls back to memory, once."""
        with self._lock:
            if self._store is None:
                try:
                    self._store = Store(self.settings.db, shared=list(self.settings.all_shared_dbs()),
                                        timeout_s=self.settings.db_timeout_s)
                except Exception as e:  # StoreError, or OSError/ImportError from an odd location or URL
                    self._fallback_store(e)
            return self._store

    def _fallback_store(self, err: Exception) -> None:
        self.warn_once("store", f"autosdpa: tuning database unusable ({err}); keeping measurements in memory "
                                "for this process only")
        prev = self._store
        self._store = Store("sqlite://")
        self._store.shared = prev.shared if prev is not None else []
        # what the stand-in replaces (the first database that failed): `autosdpa tune` must not lose it silently
        if prev is not None and prev.stands_in_for:
            self._store.stands_in_for = prev.stands_in_for
        else:
            where = prev.display_url if prev is not None else str(self.settings.db or "the user cache file")
            self._store.stands_in_for = (where, str(err))

    def _close_store(self) -> None:
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.close()
            self._store = None

    @contextlib.contextmanager
    def use_store(self, db):
        """Route lookups and saves to ``db`` (a Store, path or URL) for the block; memory starts empty."""
        with self._lock:
            prev = self._store, self._memory, self._claims
            self._store = db if isinstance(db, Store) else Store(db, timeout_s=self.settings.db_timeout_s)
            self._memory, self._claims = {}, {}
            try:
                yield self._store
            finally:
                if not isinstance(db, Store):
                    self._store.close()
                self._store, self._memory, self._claims = prev
                self.clear_plans()

    def warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warn_at_caller(message)

    # -- the first-sight path ------------------------------------------------------------------------------
    def miss(self, fk: tuple, q, k, v, m, dp, ic, sc, gqa):
        """The plan for a call whose fast key is new (cached under ``fk`` when that is safe)."""
        if getattr(self._local, "busy", False):  # re-entered from inside a backend (CausalBias calls F.sdpa)
            return None
        if _tracing():  # torch.jit.trace: record PyTorch's own op, decide nothing
            return None
        try:
            thr = self.settings.bucket_threshold
            bk = forms.bucket_key(fk, q, k, v, m, thr)
        except Exception:  # odd inputs: decided (or passed to PyTorch) the long way
            bk = None
        generation = self._generation
        plan = _ABSENT if bk is None else _bucket_plans.get(bk, _ABSENT)
        if plan is not _ABSENT:
            if isinstance(plan, Plan):
                plan = plan.sibling()
            elif isinstance(plan, Router):
                plan = plan.sibling(fk)
            self._cache(generation, fk, plan)
            return plan
        plan, cacheable = self._safe_plan(fk, q, k, v, m, dp, ic, sc, gqa)
        if cacheable:
            self._cache(generation, fk, plan, None if isinstance(plan, InvalidPlan) else bk)
        return plan

    def _cache(self, generation: int, fk: tuple, plan, bk: tuple | None = None) -> None:
        """Cache ``plan`` for the hot path, unless the plans were cleared (configure, reset, a new backend)
        since it was decided: it would then be a decision under the old settings."""
        with self._lock:
            if generation != self._generation:
                return
            if len(_plans) >= _MAX_PLANS:
                self.clear_plans()
            _plans[fk] = plan
            if bk is not None:
                _bucket_plans[bk] = plan

    def _safe_plan(self, fk, q, k, v, m, dp, ic, sc, gqa, routing: bool = False):
        """``_plan``, marked busy (a backend calling F.sdpa re-enters as plain F.sdpa); the cache or tuner
        misbehaving never breaks the caller's run: one warning per kind of failure, then F.sdpa."""
        local = self._local
        local.busy = True
        try:
            return self._plan(fk, q, k, v, m, dp, ic, sc, gqa, routing)
        except ForcedBackendError:
            raise
        except Exception as e:
            self.warn_once(f"decide:{type(e).__name__}",
                           f"autosdpa: could not decide ({type(e).__name__}: {e}); using PyTorch's SDPA")
            log.debug("decide failed", exc_info=True)
            return None, True
        finally:
            local.busy = False

    def _plan(self, fk, q, k, v, m, dp, ic, sc, gqa, routing: bool = False):
        """(plan, whether it may be cached under the fast key). ``routing``: deciding for one structure of a
        Router's calls (never another Router)."""
        call = forms.make_call(q, k, v, m, dp, ic, sc, gqa)
        form = None if call is None else forms.form_of(call)
        if call is None or form.degenerate_reason(call):  # PyTorch handles (or rejects) them; decide nothing
            return None, False
        flags = fk[_FK_FLAGS]
        if form.invalid_reason(call):  # the fast key holds all three shapes
            # PyTorch's math op raises PyTorch's error; with math switched off F.sdpa raises its own, except
            # where its CPU flash kernel would read past v (k and v lengths differ)
            kv_mismatch = call.key.shape[-2] != call.value.shape[-2]
            return (InvalidPlan(_backends.get("math")) if flags[2] or kv_mismatch else None), True
        policy = resolve(Overrides(*_override_sets[fk[_FK_OVERRIDES]]), self.settings.mode, flags, priority_set())
        if not routing and not policy.passthrough and _may_have_structure(call, m):
            return Router(fk, self._route, self._give_up), torch_flags() == flags  # decides per structure
        with self._lock:
            decision, backend, cacheable = self.decide(call, policy)
        # PyTorch's CUDA checks read the flags: another thread's sdpa_kernel meanwhile may have coloured the
        # eligibility, so such a decision serves this call only.
        cacheable = cacheable and torch_flags() == flags
        if decision.source == "invalid":  # shapes (the fast key) are what the reference rejects: cache it
            return InvalidPlan(_backends.get("math")), cacheable
        forced = policy.forced and len(policy.allowed or ()) == 1
        return plan_for(backend, decision.pytorch_choice, forced), cacheable

    def _route(self, router: Router, key, s, q, k, v, m, dp, ic, sc, gqa):
        """The plan for ``router``'s calls of structure ``s`` (None: no structure), cached in the router."""
        generation = self._generation
        with trusted(m, s):
            plan, cacheable = self._safe_plan(router.fk, q, k, v, m, dp, ic, sc, gqa, routing=True)
        if cacheable:
            with self._lock:
                if generation == self._generation:
                    router.routes[key] = plan
        return plan

    def _give_up(self, router: Router, plan) -> None:
        """``router``'s masks showed no structure: its fast key gets the plain plan, with no look per call."""
        global _last
        with self._lock:
            if _plans.get(router.fk) is router:
                _plans[router.fk] = plan
                _last = ((), None)
                fastkey.forget()

    def explain(self, q, k, v, m=None, dp=0.0, ic=False, sc=None, gqa=False) -> Decision:
        call = forms.make_call(q, k, v, m, dp, ic, sc, gqa)
        if call is None:
            return Decision("pytorch", "inputs autosdpa does not key (nested, subclass, broadcast batch, odd "
                            "arguments): passed to PyTorch", source="passthrough")
        form = forms.form_of(call)
        why = form.degenerate_reason(call)
        if why:
            return Decision("pytorch", f"{why}: passed to PyTorch, never measured", source="passthrough")
        why = form.invalid_reason(call)
        if why:
            return Decision("math", f"invalid inputs ({why}): PyTorch's math backend raises its error",
                            source="invalid")
        policy = resolve(_overrides, self.settings.mode, torch_flags(), priority_set())
        if call.structure is None and m is not None and _may_have_structure(call, m):
            call = dataclasses.replace(call, structure=detect(call.attn_mask, call.query, call.key))
        with self._lock, trusted(call.attn_mask, call.structure):
            return self.decide(call, policy)[0]

    def tune_problem(self, problem: Problem, device, *, force: bool = False,
                     config: TuneConfig | None = None) -> Decision:
        """Tune ``problem`` on synthetic inputs of its shape (offline tuning); returns the Decision."""
        call = forms.synthetic_call(problem, device)
        with self._lock, deterministic(problem.deterministic), trusted(call.attn_mask, call.structure):
            return self.decide(call, Policy(mode="tune"), config=config, force=force)[0]

    def decide(self, call: Call, policy: Policy, *, config: TuneConfig | None = None, force: bool = False
               ) -> tuple[Decision, Backend | None, bool]:
        """(decision, backend to run or None for plain F.sdpa, whether the outcome may be cached)."""
        if policy.passthrough:
            return Decision("pytorch", policy.reason, source="passthrough"), None, True
        form = forms.form_of(call)
        problem = form.problem_of(call, self.settings.bucket_threshold)
        torch_pick = form.pytorch_choice(call)
        allowed, timed, elig = self._candidates(call, policy)
        rejected = reasons_text(elig)
        eligible = [b for b in allowed if not elig[b.name]]
        base = dict(problem=problem.key, pytorch_choice=torch_pick)
        if policy.forced and not eligible:
            raise ForcedBackendError.for_names(policy.allowed, rejected)
        if not eligible:  # e.g. flags left on only a backend that cannot run this: PyTorch raises its error
            return (Decision(torch_pick or "pytorch", "no allowed backend can run these inputs: PyTorch decides",
                             rejected=rejected, source="passthrough", **base), None, True)
        envs = self._envs(call.query.device)
        mkey = (envs["torch"][0], envs["kernels"][0], problem.key)
        try:
            meas, source, cacheable = self._measurements(call, problem, envs, mkey, timed, eligible, policy,
                                                         config, force, torch_pick)
        except InvalidInputs as e:
            return (Decision("math", f"inputs rejected by the reference ({e}): PyTorch's math backend raises "
                             "its error", source="invalid", **base), None, True)
        winner, reason, source = self._choose(call, problem, envs, mkey, eligible, torch_pick, policy, source)
        for n, row in meas.items():
            if not row.ok and n not in rejected:
                rejected[n] = row.detail or row.status
        if policy.reason:
            reason = f"{reason}; {policy.reason}"
        if call.structure is not None:
            b = _backends.get(winner)
            run_as = f", run as {b.does} ({b.tolerance} to F.sdpa)" if getattr(b, "rewrite", False) else ""
            reason = f"{reason}; the mask is {call.structure.describe()}{run_as}"
        timings = {n: (meas[n].median_s if n in meas and meas[n].ok else None) for n in elig}
        decision = Decision(winner, reason, timings, rejected, problem.key, torch_pick, source)
        return decision, _backends.get(winner), cacheable

    def _candidates(self, call: Call, policy: Policy):
        """(allowed backends, backends to time, eligibility of both): every eligible default candidate is
        timed even under a restriction, so the store holds every backend's measurement."""
        device = call.query.device
        everyone = [b for b in _backends.all_backends() if b.candidate_by_default(device) and call.form in b.forms]
        if policy.allowed is None:
            allowed = everyone
        else:
            allowed = [_backends.get(n) for n in policy.allowed]
            if policy.torch_only:
                allowed = [b for b in allowed if b.torch_backend is not None and b.candidate_by_default(device)]
        elig = eligibility(call, list(dict.fromkeys(everyone + allowed)))
        timed = [b for b in dict.fromkeys(everyone + allowed) if not elig[b.name]]
        return allowed, timed, elig

    # -- measurement layers: memory -> database (own, then shared) -> tuning --------------------------------
    def environments(self, device) -> dict[str, tuple[str, dict]]:
        """{"torch": (fingerprint, fields), "kernels": (...)}: the environments that PyTorch's backends and
        this project's kernels measure in on ``device`` (rows are stored under the one they depend on)."""
        return self._envs(device)

    def _envs(self, device) -> dict[str, tuple[str, dict]]:
        return {"torch": environment(device), "kernels": environment(device, kernels=True)}

    def _measurements(self, call, problem, envs, mkey, timed, eligible, policy, config, force, torch_pick):
        """(rows by backend, where they came from, whether the outcome may be cached)."""
        meas, source = (None if force else self._memory.get(mkey)), "cache"
        if meas is None:
            meas, self._claims[mkey] = ({}, set()) if force else self._lookup(envs, problem.key)
            self._memory[mkey] = meas
            source = "database"
        self._record(problem)
        if len(eligible) < 2 or all(b.name in meas for b in eligible):
            return meas, source, True
        forbidden = _tuning_forbidden(call)
        if policy.mode != "tune" or forbidden:
            return meas, source, not forbidden
        new = self._tune(call, problem, timed, envs, config, warm=not force, eligible={b.name for b in eligible},
                         pick=torch_pick)
        meas.update(new)
        self._claims[mkey] -= set(new)
        return meas, "tuned", True

    def _lookup(self, envs, key: str) -> tuple[dict[str, Measurement], set[str]]:
        """Rows for ``key``, each backend's from the environment it depends on: shared layers first, the
        user's own rows on top. Also the names whose row is only a shared layer's claim."""
        rows: dict[str, Measurement] = {}
        claims: set[str] = set()
        kinds = {b.name: _env_kind(b) for b in _backends.all_backends()}
        try:
            store = self.store()
            for kind, (fp, _info) in envs.items():
                def mine(found):
                    return {n: r for n, r in found.items() if kinds.get(n, "kernels") == kind}
                for layer in store.shared:
                    with contextlib.suppress(StoreError):
                        got = mine(layer.lookup(fp, key))
                        rows.update(got)
                        claims |= set(got)
                own = mine(store.lookup_own(fp, key))
                rows.update(own)
                claims -= set(own)
        except StoreError as e:
            self._fallback_store(e)
        return rows, claims

    def _tune(self, call, problem, timed, envs, config, *, warm: bool = True, eligible: set[str] | None = None,
              pick: str | None) -> dict[str, Measurement]:
        """``pick``: what F.sdpa itself runs for this call (``decide``'s; jagged calls have their own)."""
        info = envs["torch"][1]
        shape = _shape_str(call)
        later, why = [], {}
        if warm and self.settings.warm_start and len(timed) > 1:
            why = self._not_timed(problem, timed, envs, pick)
            later = [b for b in timed if b.name in why]
            timed = [b for b in timed if b.name not in why]
        log.info("autosdpa: tuning %s on %s (%s)", problem.key, info.get("device_name"),
                 ", ".join(b.name for b in timed))
        device = call.query.device

        def run(backends):
            with torch.random.fork_rng(devices=[device] if call.query.is_cuda else []):
                return measure(call, backends, config or self.config, tuned_shape=shape, finish=_finisher(call, pick),
                               pytorch_choice=pick)
        rows = run(timed)
        # none of the candidates that may win passed here: time the rest after all
        if later and not any(r.ok and (eligible is None or r.backend in eligible) for r in rows):
            rows += run(later)
        elif later:
            rows += [Measurement(n, "skipped", detail=why[n], tuned_shape=shape) for n in why]
        by_kind: dict[str, list[Measurement]] = {}
        kinds = {b.name: _env_kind(b) for b in (*timed, *later)}
        for r in rows:
            by_kind.setdefault(kinds.get(r.backend, "torch"), []).append(r)
        for kind, group in by_kind.items():
            self._save(envs[kind], problem.key, group)
        return {r.backend: r for r in rows}

    def _not_timed(self, problem, timed, envs, pick) -> dict[str, str]:
        """{backend: why warm start does not time it}: ``warm.split`` over the rows of this problem on this
        hardware in other environments, each backend's from the environment kind it depends on (any layer; the
        newest row wins)."""
        kinds = {b.name: _env_kind(b) for b in timed}
        near: dict[str, tuple[Measurement, dict]] = {}
        mine = {fp for fp, _info in envs.values()}  # both kinds share the hardware: one read per database
        try:
            store = self.store()
            for db in (*store.shared, store):
                with contextlib.suppress(StoreError):
                    for name, (row, env) in db.near_rows(mine, envs["torch"][1], problem.key).items():
                        held = near.get(name)
                        if name in kinds and (held is None or row.measured_at > held[0].measured_at):
                            near[name] = (row, env)
        except StoreError:
            return {}
        here = {n: envs[k][1] for n, k in kinds.items()}
        return warm.split([b.name for b in timed], near, pick, here)[1]

    def _save(self, env: tuple[str, dict], key: str, rows: list[Measurement]) -> None:
        try:
            self.store().save(env[0], env[1], key, rows)
        except StoreError as e:
            self._fallback_store(e)
            with contextlib.suppress(StoreError):
                self._store.save(env[0], env[1], key, rows)

    # -- choosing ------------------------------------------------------------------------------------------
    def _choose(self, call, problem, envs, mkey, eligible, torch_pick, policy, source):
        """(winner, reason, source). A winner whose row is a shared layer's claim is checked once per process
        on these inputs; a failure is stored locally as a rejection and the choice made again."""
        names = [b.name for b in eligible]
        if len(names) == 1:
            return names[0], "the only allowed backend that can run these inputs", (
                "forced" if policy.forced else "only")
        meas, claims = self._memory[mkey], self._claims.setdefault(mkey, set())
        pick = torch_pick if torch_pick in names else None
        while True:
            winner, reason = choose(meas, names, pick)
            if winner is None:
                why = ("no measurement yet (mode 'lookup' or tuning not allowed here): PyTorch's choice"
                       if not any(n in meas for n in names) else "no candidate passed its check: PyTorch's choice")
                return pick or names[0], why, "default"
            if winner not in claims:
                break
            claims.discard(winner)
            backend = _backends.get(winner)
            bad = check_claim(call, backend)
            if bad is None:
                break
            meas[winner] = bad  # a local rejection beats any layer, in this process and the next
            self._save(envs[_env_kind(backend)], problem.key, [bad])
        if policy.allowed is None:
            fp, info = envs["torch"]
            own = {n: r.detail or r.status for n, r in meas.items() if r.status == "rejected" and n not in claims}
            agreed, kept = consensus.agree(self.store(), fp, info, problem.key, winner, names, own)
            if kept:
                return winner, f"{reason}; {kept}", source
            if agreed != winner:
                return agreed, f"agreed with the other ranks (own pick: {winner})", "agreed"
        return winner, reason, source

    def _record(self, problem: Problem) -> None:
        path = self.settings.record
        if not path or problem.key in self._recorded:
            return
        self._recorded.add(problem.key)
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"problem": problem.key, "time": time.time()}) + "\n")
        except OSError as e:
            self.warn_once("record", f"autosdpa: cannot append to AUTOSDPA_RECORD={path}: {e}")


@contextlib.contextmanager
def deterministic(on: bool):
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


dispatcher = Dispatcher()


def reset() -> None:
    """Forget everything in memory and re-read the environment (AUTOSDPA_*): for tests and notebooks."""
    dispatcher.reset()


def _traced(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What torch.compile traces in place of the dispatcher: the custom op ``autosdpa::sdpa``, which runs the
    tuned winner when the graph runs (see ``compiled``), or plain F.sdpa under AUTOSDPA_COMPILE=pytorch and for
    calls the op cannot express. Nothing is tuned while tracing."""
    if isinstance(attn_mask, StructuredMask):  # a graph takes the dense mask it stands for
        attn_mask = attn_mask.materialize(query.device)
    if dispatcher.settings.compile == "dispatch" and compiled.expressible(query, attn_mask, dropout_p, is_causal,
                                                                          enable_gqa):
        if torch.is_autocast_enabled(query.device.type):  # the op has no autocast rule: cast as F.sdpa's has
            query, key, value, attn_mask = autocast_inputs(query.device.type, query, key, value, attn_mask)
        return compiled.sdpa_op(query, key, value, attn_mask, float(dropout_p), is_causal,
                                None if scale is None else float(scale), enable_gqa)
    return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


compiled.use(scaled_dot_product_attention)
with contextlib.suppress(AttributeError, TypeError):
    torch.compiler.substitute_in_graph(scaled_dot_product_attention)(_traced)
# torch.jit.script compiles calls of this function to PyTorch's own op (it cannot script the dispatcher).
with contextlib.suppress(AttributeError, ImportError):
    torch.jit._builtins._register_builtin(scaled_dot_product_attention, "aten::scaled_dot_product_attention")

_backends.base.on_change(dispatcher.clear_plans)


def get_store() -> Store:
    """The user's database (with its shared layers) that the dispatcher reads and writes."""
    return dispatcher.store()


def clear_plans() -> None:
    dispatcher.clear_plans()
