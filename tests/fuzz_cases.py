"""Differential fuzzing of ``autosdpa.sdpa`` against ``F.scaled_dot_product_attention``: the case description,
its hypothesis strategies, and the one check, shared by ``tests/test_fuzz.py`` and ``scripts/fuzz.py``.

A ``Case`` is plain data (shapes, dtypes, memory layouts, mask, flags). Its tensors are built by evaluating the
same Python source that ``Case.repro()`` prints, so a printed repro is exactly what ran. ``check`` calls F.sdpa
and autosdpa (twice: first sight, then the cached plan) on the same tensors and returns the differences:
valid inputs must give the same values (NaN where F.sdpa gives NaN), gradients and output strides; inputs
F.sdpa rejects must raise the same exception type. ``check_pair`` does the same for two calls that share
autosdpa's fast key (shapes, q dtype, mask signature, flags) but differ in what that key leaves out.

``Case.winner`` makes the first sight deterministic: "math"/"flash" store measurements that make that backend
the winner of the problem (if it is new to this process and the backend is eligible), "tune" times for real.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from typing import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right, causal_upper_left

import autosdpa
from autosdpa.forms import dense, make_call
from autosdpa.dispatch import deterministic, dispatcher
from autosdpa.problem import Problem
from autosdpa.store import Measurement

FLOATS = ("float64", "float32", "float16", "bfloat16")
#: value tolerance (atol = rtol) by query dtype; gradients get GRAD_FACTOR times more
TOL = {"float64": 1e-7, "float32": 1e-5, "float16": 1e-2, "bfloat16": 2e-2}
GRAD_FACTOR = 10
#: The one documented difference: torch 2.13's CPU flash kernel accepts k and v of different lengths and reads
#: past v (garbage; with gradients a heap corruption that aborts the process), where autosdpa raises
#: RuntimeError as PyTorch's math backend does. So for such cases the reference is F.sdpa restricted to math.
KV_MISMATCH_REFERENCE = "F.sdpa under sdpa_kernel(MATH)"


# -- the case -------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
    """How a tensor sits in memory: ``perm`` its dims' memory order (outermost first; None = contiguous),
    ``step`` a (dim, step) slice of a larger buffer, ``expand`` dims broadcast with stride 0."""

    perm: tuple | None = None
    step: tuple | None = None
    expand: tuple = ()

    def plain(self) -> bool:
        return self.perm is None and self.step is None and not self.expand


PLAIN = Layout()


@dataclasses.dataclass(frozen=True)
class Mask:
    """An attention mask. ``kind``: "bool", "float", "causal_ul", "causal_lr" (CausalBias). ``dims``: which of the
    last ``len(dims)`` dims of the full mask shape (batch..., Hq, Lq, Lk) are full (True) or 1. ``bad``:
    (dim, delta) added to one size (an invalid shape); for a CausalBias, (dq, dk) added to its lengths.
    ``dtype``: "bool", "float32", "q" (the query's) or another name. ``p``: masked fraction (bool) or -inf
    fraction (float)."""

    kind: str = "bool"
    dims: tuple = (True, True)
    dtype: str = "bool"
    p: float = 0.3
    layout: Layout = PLAIN
    grad: bool = False
    bad: tuple | None = None


@dataclasses.dataclass(frozen=True)
class Case:
    rank: int = 4
    batch: tuple = (2,)
    hq: int = 2
    hk: int = 2
    hv: int = 2
    lq: int = 4
    lk: int = 4
    lv: int = 4
    d: int = 8
    dk: int = 8
    dv: int = 8
    dtypes: tuple = ("float32", "float32", "float32")  # q, k, v
    layouts: tuple = (PLAIN, PLAIN, PLAIN)
    grads: tuple = (False, False, False)               # requires_grad of q, k, v
    kv_rank: int | None = None                         # k and v of another rank (invalid)
    kv_batch: tuple | None = None                      # k and v of another batch (broadcast or invalid)
    mask: Mask | None = None
    is_causal: object = False
    dropout_p: object = 0.0
    scale: object = None
    enable_gqa: object = False
    grad_mode: str = "grad"                            # "grad", "no_grad", "inference", "forward" (AD)
    autocast: str | None = None                        # torch.autocast("cpu", dtype=...) around both calls
    flags: str | None = None                           # sdpa_kernel([...]) around both: "math", "flash+math"
    det: bool = False                                  # torch.use_deterministic_algorithms(True) around both
    winner: str = "tune"                               # "tune", "math", "flash"
    seed: int = 0

    # shapes ------------------------------------------------------------------------------------------------
    def shape(self, which: str) -> tuple:
        rank = self.rank if which == "q" or self.kv_rank is None else self.kv_rank
        batch = self.batch if which == "q" or self.kv_batch is None else self.kv_batch
        h, l, d = {"q": (self.hq, self.lq, self.d), "k": (self.hk, self.lk, self.dk),
                   "v": (self.hv, self.lv, self.dv)}[which]
        if rank <= 2:
            return (l, d)
        if rank == 3:
            return (batch[0] if batch else 1, l, d)
        lead = tuple(batch[:rank - 3]) + (1,) * max(0, rank - 3 - len(batch))
        return (*lead, h, l, d)

    def mask_shape(self) -> tuple:
        full = (*self.shape("q")[:-2], self.lq, self.lk)
        m = self.mask
        dims = m.dims
        shape = [n if keep else 1 for n, keep in zip(full[len(full) - len(dims):], dims)] if len(dims) <= len(
            full) else [1] * (len(dims) - len(full)) + list(full)
        if m.bad is not None:
            i, delta = m.bad
            shape[i % len(shape)] = max(0, shape[i % len(shape)] + delta)
        return tuple(shape)

    # source ------------------------------------------------------------------------------------------------
    def tensor_lines(self) -> list[str]:
        lines = []
        for i, name in enumerate("qkv"):
            dt = self.dtypes[i]
            expr = _tensor_expr(f"torch.randn({{}}, generator=_g({self.seed + i}), dtype=torch.float64)",
                                self.shape(name), self.layouts[i], dt)
            if self.grads[i] and dt in FLOATS:
                expr += ".requires_grad_()"
            lines.append(f"{name} = {expr}")
        if self.mask is not None:
            lines.append(f"m = {self._mask_expr()}")
        return lines

    def _mask_expr(self) -> str:
        m, s = self.mask, self.seed + 3
        if m.kind in ("causal_ul", "causal_lr"):
            dq, dk = m.bad or (0, 0)
            fn = "causal_upper_left" if m.kind == "causal_ul" else "causal_lower_right"
            return f"{fn}({max(0, self.lq + dq)}, {max(0, self.lk + dk)})"
        dtype = self.dtypes[0] if m.dtype == "q" else m.dtype
        if m.kind == "bool":
            base = f"(torch.rand({{}}, generator=_g({s})) >= {m.p})"
            expr = _tensor_expr(base, self.mask_shape(), m.layout, dtype if dtype != "bool" else None)
        else:
            base = f"torch.randn({{}}, generator=_g({s}), dtype=torch.float64)"
            if m.p:
                base += f".masked_fill(torch.rand({{}}, generator=_g({s + 1})) < {m.p}, -math.inf)"
            expr = _tensor_expr(base, self.mask_shape(), m.layout, dtype)
        if m.grad and dtype in FLOATS:
            expr += ".requires_grad_()"
        return expr

    def kwargs_source(self) -> str:
        parts = [] if self.mask is None else ["attn_mask=m"]
        for name, default in (("dropout_p", 0.0), ("is_causal", False), ("scale", None), ("enable_gqa", False)):
            value = getattr(self, name)
            if value is not default and not (type(value) is type(default) and value == default):
                parts.append(f"{name}={_src(value)}")
        return "dict(" + ", ".join(parts) + ")"

    def context_sources(self) -> list[str]:
        """The ``with`` items both functions run under (grad mode, autocast, PyTorch's flags, determinism)."""
        items = [{"grad": "torch.enable_grad()", "no_grad": "torch.no_grad()", "inference": "torch.inference_mode()",
                  "forward": "fwAD.dual_level()"}[self.grad_mode]]
        if self.autocast:
            items.append(f'torch.autocast("cpu", dtype=torch.{self.autocast})')
        if self.flags:
            names = {"math": "SDPBackend.MATH", "flash": "SDPBackend.FLASH_ATTENTION"}
            items.append("sdpa_kernel([" + ", ".join(names[n] for n in self.flags.split("+")) + "])")
        if self.det:
            items.append("deterministic(True)")
        return items

    def build(self):
        """(q, k, v, kwargs) exactly as ``repro()`` writes them."""
        env = _namespace()
        exec("\n".join(self.tensor_lines()) + f"\nkw = {self.kwargs_source()}", env)  # noqa: S102 - our source
        return env["q"], env["k"], env["v"], env["kw"]

    def context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        env = _namespace()
        for src in self.context_sources():
            stack.enter_context(eval(src, env))  # noqa: S307 - our own source, as repro() prints it
        return stack

    def repro(self, title: str = "") -> str:
        """A standalone script (run from tests/): F.sdpa and autosdpa on this case, ``winner`` made to win."""
        head = [f"# {title}" if title else "# autosdpa vs F.sdpa", "import math", "import torch",
                "import torch.autograd.forward_ad as fwAD", "import torch.nn.functional as F",
                "from torch.nn.attention import SDPBackend, sdpa_kernel",
                "from torch.nn.attention.bias import causal_lower_right, causal_upper_left", "import autosdpa",
                "from autosdpa.dispatch import deterministic",
                "from fuzz_cases import prefer  # tests/fuzz_cases.py", "", "def _g(seed):",
                "    return torch.Generator().manual_seed(seed)", ""]
        body = self.tensor_lines() + [f"kw = {self.kwargs_source()}"]
        ctx = ", ".join(self.context_sources())
        if self.winner != "tune":
            body.append(f"with {ctx}:\n    prefer({self.winner!r}, q, k, v, kw)  # stored rows: {self.winner} wins")
        for fn, var in (("F.scaled_dot_product_attention", "ref"), ("autosdpa.sdpa", "out")):
            lines = [f"torch.manual_seed({self.seed})"] if _dropout(self) else []
            if self.grad_mode == "forward":
                lines += [f"t = torch.randn({self.shape('q')}, generator=_g({self.seed + 11}), "
                          f"dtype=torch.float64).to(q.dtype)",
                          f"{var}, {var}_tangent = fwAD.unpack_dual({fn}(fwAD.make_dual(q, t), k, v, **kw))"]
            else:
                lines.append(f"{var} = {fn}(q, k, v, **kw)")
            body.append(f"with {ctx}:\n" + "\n".join("    " + x for x in lines))
        body.append("print(out.dtype, ref.dtype, out.stride(), ref.stride(), (out - ref).abs().max())")
        return "\n".join(head + body)


def _src(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return f"float({str(value)!r})"
    return repr(value)


def _dropout(case: Case) -> bool:
    return isinstance(case.dropout_p, (int, float)) and case.dropout_p != 0


def _namespace() -> dict:
    return {"torch": torch, "math": math, "causal_lower_right": causal_lower_right,
            "causal_upper_left": causal_upper_left, "_g": lambda s: torch.Generator().manual_seed(s), "fwAD": fwAD,
            "SDPBackend": SDPBackend, "sdpa_kernel": sdpa_kernel, "deterministic": deterministic}


def _tensor_expr(base: str, shape: tuple, lay: Layout, dtype: str | None) -> str:
    """Source of a tensor of ``shape`` laid out as ``lay``; ``base`` formats a buffer of a given shape."""
    n = len(shape)
    perm = lay.perm if lay.perm is not None and len(lay.perm) == n else tuple(range(n))
    expand = tuple(d for d in lay.expand if d < n)
    sizes = [1 if i in expand else s for i, s in enumerate(shape)]
    step = lay.step if lay.step is not None and lay.step[0] < n and lay.step[0] not in expand else None
    if step:
        sizes[step[0]] *= step[1]
    mem = tuple(sizes[d] for d in perm)
    expr = base.format(*([mem] * base.count("{}")))
    if dtype is not None and dtype != "float64":
        expr += f".to(torch.{dtype})"
    if perm != tuple(range(n)):
        expr += f".permute{tuple(perm.index(d) for d in range(n))}"
    if step:
        expr += "[" + ", ".join([":"] * step[0] + [f"::{step[1]}"]) + "]"
    if expand:
        expr += f".expand{tuple(shape)}"
    return expr


# -- making a backend win -----------------------------------------------------------------------------------

def prefer(winner: str, q, k, v, kw: dict) -> bool:
    """Store measurements that make ``winner`` ("math"/"flash") the fastest for this call's problem, as if
    tuned, when the problem is new to this process. Returns whether it stored them. Call it under the same
    grad mode and determinism as the call (the problem key holds both)."""
    call = make_call(q, k, v, **kw)
    if call is None or dense.degenerate_reason(call) or dense.invalid_reason(call):
        return False
    problem = Problem.from_call(call, dispatcher.settings.bucket_threshold)
    if problem.key in dispatcher.measured_problems():
        return False
    times = {"math": 1e-3, "flash": 1e-3, winner: 1e-6}
    fp, info = dispatcher.environments(q.device)["torch"]
    dispatcher.store().save(fp, info, problem.key, [Measurement(n, "ok", t, 0.0, 10) for n, t in times.items()])
    return True


# -- the check ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    out: torch.Tensor | None = None
    exc: BaseException | None = None
    grads: tuple | BaseException | None = None
    warned: tuple = ()


@dataclasses.dataclass(frozen=True)
class Failure:
    kind: str     # e.g. "values", "exception type", "strides"
    stage: str    # "first", "cached", "pair-first", "pair-second", "pair-second-cached"
    detail: str
    excess: float = math.inf  # values and grads: max |autosdpa - F.sdpa| / max(1, max |F.sdpa|) over the tolerance

    def __str__(self) -> str:
        return f"[{self.stage}] {self.kind}: {self.detail}"


def reference(case: Case, q, k, v, kw) -> Outcome:
    """F.sdpa's outcome, or for k/v of different lengths, PyTorch's math backend's (see KV_MISMATCH_REFERENCE)."""
    return run_one(F.scaled_dot_product_attention, case, q, k, v, kw, math_only=case.lk != case.lv)


def run_one(fn: Callable, case: Case, q, k, v, kw, math_only: bool = False) -> Outcome:
    """``fn(q, k, v, **kw)`` under the case's contexts and dropout seed; then the gradients of the inputs that
    require grad, or for forward-mode AD the output's tangent (in ``grads``)."""
    with warnings.catch_warnings(record=True) as caught, case.context():
        warnings.simplefilter("always")
        if math_only:
            ctx = sdpa_kernel([SDPBackend.MATH])
            ctx.__enter__()
        try:
            res = _call(fn, case, q, k, v, kw)
        finally:
            if math_only:
                ctx.__exit__(None, None, None)
    res.warned = _autosdpa_warnings(caught)
    return res


def _call(fn: Callable, case: Case, q, k, v, kw) -> Outcome:
    if _dropout(case):
        torch.manual_seed(case.seed)
    try:
        if case.grad_mode == "forward":
            t = torch.randn(q.shape, generator=torch.Generator().manual_seed(case.seed + 11),
                            dtype=torch.float64).to(q.dtype)
            out, tangent = fwAD.unpack_dual(fn(fwAD.make_dual(q, t), k, v, **kw))
            return Outcome(out=out, grads=(tangent,))
        out = fn(q, k, v, **kw)
    except Exception as e:  # noqa: BLE001 - comparing exception types is the point
        return Outcome(exc=e)
    res = Outcome(out=out)
    if isinstance(out, torch.Tensor) and out.requires_grad:
        inputs = [t for t in (q, k, v, kw.get("attn_mask")) if isinstance(t, torch.Tensor) and t.requires_grad]
        g = torch.Generator().manual_seed(case.seed + 7)
        grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
        try:
            res.grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
        except Exception as e:  # noqa: BLE001
            res.grads = e
    return res


def _autosdpa_warnings(caught) -> tuple:
    return tuple(str(w.message) for w in caught if "autosdpa" in str(w.message))


def compare(ref: Outcome, got: Outcome, case: Case, stage: str, truth: Callable | None = None) -> list[Failure]:
    """What differs between F.sdpa's outcome ``ref`` and autosdpa's ``got``. ``truth()`` gives PyTorch's math
    backend's output in float64, asked only when the values differ: if autosdpa matches it and F.sdpa does
    not, the difference is a NOTE (F.sdpa's own pick is wrong there; autosdpa's tuner rejected it)."""
    fails = [Failure("warned", stage, w[:300]) for w in got.warned]
    if ref.exc is not None:
        if got.exc is None:
            return fails + [Failure("returned where F.sdpa raised", stage, _exc_text(ref.exc))]
        if type(got.exc) is not type(ref.exc):
            return fails + [Failure("exception type", stage,
                                    f"F.sdpa: {_exc_text(ref.exc)}; autosdpa: {_exc_text(got.exc)}")]
        return fails
    if got.exc is not None:
        return fails + [Failure("raised where F.sdpa returned", stage, _exc_text(got.exc))]
    return fails + _compare_tensors(ref, got, case, stage, truth)


def _compare_tensors(ref: Outcome, got: Outcome, case: Case, stage: str, truth) -> list[Failure]:
    a, b = got.out, ref.out
    if not isinstance(a, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
        return [Failure("shape or dtype", stage, f"F.sdpa {tuple(b.shape)} {b.dtype}, autosdpa "
                        f"{getattr(a, 'shape', type(a))} {getattr(a, 'dtype', '')}")]
    fails, note = [], ""
    tol = TOL.get(str(b.dtype).replace("torch.", ""), 1e-5)
    exact = _Lazy(truth)
    why = _close(a, b, tol)
    if why:
        note = _verdict(a, b, exact.out(a.dtype), tol)
        fails.append(Failure(note + ("nan pattern" if why.startswith("NaN") else "values"), stage, why,
                             _excess(a, b, tol)))
    if b.numel() and any(sa != sb for n, sa, sb in zip(b.shape, a.stride(), b.stride()) if n != 1):
        fails.append(Failure("strides", stage, f"F.sdpa {b.stride()}, autosdpa {a.stride()} for shape "
                             f"{tuple(b.shape)}"))
    for f, i in _compare_grads(ref, got, stage, tol):
        # a gradient of an output that is already a note differs for the same reason; else its own verdict
        g_note = note or (_verdict(got.grads[i], ref.grads[i], exact.grad(i, got.grads[i].dtype),
                                   tol * GRAD_FACTOR) if f.kind == "grads" else "")
        fails.append(dataclasses.replace(f, kind=g_note + f.kind))
    return fails


class _Lazy:
    """The float64 truth, computed once and only when a difference needs a verdict."""

    def __init__(self, truth):
        self.truth, self.value, self.done = truth, None, False

    def _get(self):
        if not self.done:
            self.value, self.done = _truth(self.truth), True
        return self.value

    def out(self, dtype):
        v = self._get()
        return None if v is None else v[0].to(dtype)

    def grad(self, i: int, dtype):
        v = self._get()
        if v is None or v[1] is None or i >= len(v[1]) or v[1][i] is None:
            return None
        return v[1][i].to(dtype)


def _compare_grads(ref: Outcome, got: Outcome, stage: str, tol: float) -> list[tuple[Failure, int]]:
    """(failure, index of the gradient) pairs."""
    if isinstance(ref.grads, BaseException) or isinstance(got.grads, BaseException):
        if type(ref.grads) is not type(got.grads):
            return [(Failure("backward", stage, f"F.sdpa: {_exc_text(ref.grads)}; autosdpa: "
                             f"{_exc_text(got.grads)}"), 0)]
        return []
    if (ref.grads is None) != (got.grads is None):
        return [(Failure("grad presence", stage, f"F.sdpa grads {ref.grads is not None}, autosdpa "
                         f"{got.grads is not None}"), 0)]
    fails = []
    for i, (ga, gb) in enumerate(zip(got.grads or (), ref.grads or ())):
        name = ("first", "second", "third", "fourth")[i]
        if (ga is None) != (gb is None):
            fails.append((Failure("grad presence", stage, f"{name} input: F.sdpa {gb is not None}, "
                                  f"autosdpa {ga is not None}"), i))
            continue
        why = None if ga is None else _close(ga, gb, tol * GRAD_FACTOR)
        if why:
            fails.append((Failure("grads", stage, f"{name} input requiring grad (or tangent): {why}",
                                  _excess(ga, gb, tol * GRAD_FACTOR)), i))
    return fails


#: Kinds that start with NOTE are reported, not failures: autosdpa differs from F.sdpa because F.sdpa's own pick
#: is wrong there (it is off PyTorch's math backend in float64, autosdpa is not: e.g. CPU flash with a negative
#: scale and a causal mask), or because the input is ill-conditioned (F.sdpa is off float64 math by more than
#: the tolerance too, and autosdpa no more than twice as far).
NOTE = "note: "
F_WRONG = NOTE + "F.sdpa wrong, autosdpa matches float64 math: "
ILL = NOTE + "ill-conditioned, F.sdpa off float64 math too: "


def _error(x: torch.Tensor, exact: torch.Tensor) -> float:
    x64, e64 = x.detach().double(), exact.double()
    if not torch.equal(x64.isnan(), e64.isnan()):
        return math.inf
    return (x64 - e64).abs().nan_to_num(0.0, posinf=math.inf).max().item() if x.numel() else 0.0


def _verdict(a: torch.Tensor, b: torch.Tensor, exact: torch.Tensor | None, tol: float) -> str:
    """"" (a failure), F_WRONG or ILL, for autosdpa's ``a`` that differs from F.sdpa's ``b``."""
    if exact is None:
        return ""
    if not _close(a, exact, tol) and _close(b, exact, tol):
        return F_WRONG
    err_a, err_b = _error(a, exact), _error(b, exact)
    if _close(b, exact, tol) and err_a <= max(2 * err_b, tol) and math.isfinite(err_a):
        return ILL
    return ""


def is_failure(f: Failure) -> bool:
    return not f.kind.startswith(NOTE)


def _truth(truth):
    """(output, gradients) of PyTorch's math backend in float64, or None when there is no verdict."""
    if truth is None:
        return None
    try:
        return truth()
    except Exception:  # noqa: BLE001 - no verdict
        return None


def math64(case: Case, q, k, v, kw):
    """PyTorch's math backend in float64 on the same inputs: (output, gradients of the inputs that require
    grad, for the same output gradient as ``run_one``'s, or None). None with dropout (other random draws) and
    for forward-mode AD."""
    if _dropout(case) or case.grad_mode == "forward":
        return None
    m = kw.get("attn_mask")
    dense = isinstance(m, torch.Tensor) and not isinstance(m, CausalBias)
    leaves = [t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t.detach()
              for t in (q, k, v)]
    mask = m.detach().double().requires_grad_(m.requires_grad) if dense and m.is_floating_point() else m
    grad = case.grad_mode == "grad" and case.autocast is None
    with torch.set_grad_enabled(grad), sdpa_kernel([SDPBackend.MATH]):
        kw64 = dict(kw, attn_mask=mask) if "attn_mask" in kw else kw
        out = F.scaled_dot_product_attention(*leaves, **kw64)
        inputs = [t for t in (*leaves, mask) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not (grad and inputs and out.requires_grad):
            return out, None
        g = torch.Generator().manual_seed(case.seed + 7)
        grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(q.dtype).double()
        return out, torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


def _excess(a: torch.Tensor, b: torch.Tensor, tol: float) -> float:
    """How many tolerances apart ``a`` is from ``b``, relative to max(1, max |b|) (inf for NaN patterns)."""
    a64, b64 = a.detach().double(), b.detach().double()
    if not torch.equal(a64.isnan(), b64.isnan()):
        return math.inf
    diff = (a64 - b64).abs().nan_to_num(0.0, posinf=math.inf).max().item()
    return diff / max(1.0, b64.abs().nan_to_num(0.0).max().item()) / tol


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> str | None:
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    if not a.numel():
        return None
    a64, b64 = a.detach().double(), b.detach().double()
    na, nb = a64.isnan(), b64.isnan()
    if not torch.equal(na, nb):
        return f"NaN at {int(na.sum())} places in autosdpa, {int(nb.sum())} in F.sdpa"
    try:
        torch.testing.assert_close(a64, b64, atol=tol, rtol=tol, equal_nan=True)
    except AssertionError:
        diff = (a64 - b64).abs().nan_to_num(0.0, posinf=math.inf)
        return f"max abs diff {diff.max().item():.3g} (tol {tol:g}, |F.sdpa| max " \
               f"{b64.abs().nan_to_num(0.0).max().item():.3g})"
    return None


def _exc_text(e) -> str:
    if e is None:
        return "no exception"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:200]}"


def _same_tensors(before, after) -> bool:
    return all(not isinstance(x, torch.Tensor) or isinstance(x, CausalBias) or torch.equal(x.detach(), y.detach())
               for x, y in zip(before, after))


def check(case: Case) -> list[Failure]:
    """F.sdpa vs autosdpa on ``case``: first sight, then the cached plan."""
    q, k, v, kw = case.build()
    ref = reference(case, q, k, v, kw)
    if case.winner != "tune":
        with contextlib.suppress(Exception), case.context():
            prefer(case.winner, q, k, v, kw)
    fails = []
    for stage in ("first", "cached"):
        fails += compare(ref, run_one(autosdpa.sdpa, case, q, k, v, kw), case, stage,
                         lambda: math64(case, q, k, v, kw))
    q2, k2, v2, kw2 = case.build()
    if not _same_tensors((q, k, v, kw.get("attn_mask")), (q2, k2, v2, kw2.get("attn_mask"))):
        fails.append(Failure("input changed", "cached", "an input tensor changed during the calls"))
    return fails


def check_pair(first: Case, second: Case) -> list[Failure]:
    """A valid call, then one with the same fast key that differs in what the key leaves out."""
    fails = []
    built = [c.build() for c in (first, second)]
    refs = [reference(c, *b) for c, b in zip((first, second), built)]
    if first.winner != "tune":
        with contextlib.suppress(Exception), first.context():
            prefer(first.winner, *built[0])
    fails += compare(refs[0], run_one(autosdpa.sdpa, first, *built[0]), first, "pair-first",
                     lambda: math64(first, *built[0]))
    for stage in ("pair-second", "pair-second-cached"):
        fails += compare(refs[1], run_one(autosdpa.sdpa, second, *built[1]), second, stage,
                         lambda: math64(second, *built[1]))
    return fails


# -- strategies -----------------------------------------------------------------------------------------------

def weighted(*pairs):
    """one_of with integer weights: ``(weight, strategy)``; earlier entries are what hypothesis shrinks to."""
    options = [s for w, s in pairs for _ in range(w)]
    return st.one_of(options)


lengths = weighted((3, st.integers(1, 9)), (2, st.integers(0, 40)), (1, st.sampled_from([0, 1, 15, 16, 17, 33])))
head_dims = weighted((6, st.integers(1, 16)), (2, st.sampled_from([24, 32, 40, 64])),
                      (1, st.sampled_from([80, 96, 128, 160, 192, 256])))
scales = weighted((6, st.none()), (2, st.floats(0.05, 2.0)),
                   (2, st.sampled_from([0.0, -0.5, -1.0, 1, 1e-6, 30.0, 1e4, -1e4])))


@st.composite
def layouts(draw, rank: int, last_dense: bool = False) -> Layout:
    """A memory layout; ``last_dense`` keeps the last dim innermost with stride 1 (what fused kernels need)."""
    kind = draw(st.sampled_from(["plain"] * 4 + ["blhd", "perm", "step", "expand", "mixed"]))
    if kind == "plain" or rank < 2:
        return PLAIN
    if kind == "blhd":
        if rank < 4:
            return Layout(perm=(1, 0, 2) if rank == 3 else None)
        return Layout(perm=tuple(range(rank - 3)) + (rank - 2, rank - 3, rank - 1))
    free = rank - 1 if last_dense else rank  # dims that may move, be sliced or expanded
    perm = None
    if kind in ("perm", "mixed"):
        perm = tuple(draw(st.permutations(range(free)))) + ((rank - 1,) if last_dense else ())
    step = (draw(st.integers(0, free - 1)), draw(st.sampled_from([2, 3]))) if kind in ("step", "mixed") else None
    expand = ()
    if kind in ("expand", "mixed"):
        expand = tuple(sorted(draw(st.sets(st.integers(0, free - 1), min_size=1, max_size=2))))
    return Layout(perm=perm, step=step, expand=expand)


@st.composite
def masks(draw, case: Case, fused: bool = False) -> Mask | None:
    kind = draw(st.sampled_from(["none"] * 4 + ["bool"] * 3 + ["float"] * 2 + ["causal_ul", "causal_lr"]))
    if kind == "none":
        return None
    if kind.startswith("causal"):
        return Mask(kind=kind)
    full_rank = len(case.shape("q"))
    n = draw(st.sampled_from([2, 4]) if fused and full_rank == 4 else st.integers(2, full_rank))
    dims = tuple(draw(st.booleans()) if i < n - 2 else draw(st.sampled_from([True, True, True, False]))
                 for i in range(n))
    dtype = "bool" if kind == "bool" else draw(st.sampled_from(["float32", "q", "q"]))
    p = draw(st.sampled_from([0.0, 0.2, 0.5, 0.9])) if kind == "bool" else draw(st.sampled_from([0.0, 0.0, 0.3, 0.9]))
    grad = kind == "float" and draw(st.integers(0, 9)) == 0
    return Mask(kind=kind, dims=dims, dtype=dtype, p=p, layout=draw(layouts(n, fused)), grad=grad)


def _shrink_batch(batch: tuple, per: int, limit: int = 16_384) -> tuple:
    """Keep the tensors small: cut batch dims until batch * per fits ``limit`` elements."""
    batch = list(batch)
    while batch and math.prod(batch) * per > limit and max(batch) > 1:
        batch[batch.index(max(batch))] = 1
    return tuple(batch)


@st.composite
def valid_cases(draw, grads: bool | None = None, dropout: bool = True,
                winners: tuple = ("math", "math", "flash", "tune")) -> Case:
    """Inputs F.sdpa accepts (mostly: some corners, e.g. huge scales, are still up to PyTorch). ``grads``:
    whether some inputs require grad (None: either); ``winners``: what first sight picks from."""
    fused = draw(st.booleans())  # half the cases: inputs PyTorch's CPU flash kernel takes (if the rest allows)
    rank = 4 if fused else draw(st.sampled_from([3, 4, 4, 5]))
    batch = tuple(draw(st.integers(1, 3)) for _ in range(max(1, rank - 3)))
    hk = draw(st.integers(1, 3))
    gqa = rank >= 4 and draw(st.integers(0, 3)) == 0
    hq = hk * draw(st.integers(1, 3)) if gqa else hk
    lq, lk = draw(lengths), draw(lengths)
    d = draw(head_dims)
    dv = d if fused else draw(weighted((3, st.just(d)), (1, head_dims)))
    per = max(hq, 1) * max(lq, lk, 1) * max(d, dv)
    case = Case(rank=rank, batch=_shrink_batch(batch, per), hq=hq, hk=hk, hv=hk, lq=lq, lk=lk, lv=lk, d=d, dk=d,
                dv=dv, enable_gqa=gqa or (rank >= 4 and draw(st.integers(0, 9)) == 0))
    dt = draw(st.sampled_from(FLOATS))
    case = dataclasses.replace(case, dtypes=(dt,) * 3, layouts=tuple(draw(layouts(rank, fused)) for _ in range(3)))
    mask = draw(masks(case, fused))
    causal = mask is None and draw(st.integers(0, 2)) == 0
    want_grads = draw(st.integers(0, 2)) == 0 if grads is None else grads
    rg = tuple(draw(st.booleans()) for _ in range(3)) if want_grads else (False,) * 3
    if want_grads and not any(rg):
        rg = (True, True, True)
    drop = draw(st.sampled_from([0.0] * 9 + [0.3])) if dropout else 0.0
    mode = draw(st.sampled_from(["grad"] * 6 + ["no_grad", "inference"])) if want_grads else "grad"
    if draw(st.integers(0, 29)) == 0:
        mode, rg = "forward", (False,) * 3
    return dataclasses.replace(
        case, mask=mask, is_causal=causal, scale=draw(scales), dropout_p=drop, grads=rg, grad_mode=mode,
        winner=draw(st.sampled_from(list(winners))), seed=draw(st.integers(0, 2**20)),
        **draw(states))


#: Process-wide state around both calls, each rarely: autocast, PyTorch's backend flags, determinism.
states = st.fixed_dictionaries({
    "autocast": st.sampled_from([None] * 19 + ["bfloat16", "float16"]),
    "flags": st.sampled_from([None] * 19 + ["math", "flash", "flash+math"]),
    "det": st.sampled_from([False] * 29 + [True]),
})


#: One change each that F.sdpa rejects (or, for some, may accept: the check compares with whatever it does).
def _invalid_changes(c: Case) -> dict[str, Callable[[], Case]]:
    r = dataclasses.replace
    other = {"float32": "float64", "float64": "float32", "float16": "bfloat16", "bfloat16": "float16"}
    dq, dk, dv = c.dtypes
    m = c.mask or Mask(kind="bool", dims=(True, True))
    return {
        "k dtype": lambda: r(c, dtypes=(dq, other[dk], dv)),
        "v dtype": lambda: r(c, dtypes=(dq, dk, other[dv])),
        "int inputs": lambda: r(c, dtypes=("int64",) * 3, grads=(False,) * 3),
        "k/v length": lambda: r(c, lv=c.lk + 1 if c.lk < 3 else c.lk - 1),
        "k head dim": lambda: r(c, dk=c.d + 1),
        "v heads": lambda: r(c, hv=c.hk + 1),
        "q heads not a multiple": lambda: r(c, hq=c.hk * 2 + 1, hk=2, hv=2, enable_gqa=True),
        "heads without gqa": lambda: r(c, hq=c.hk * 2, enable_gqa=False),
        "k/v rank": lambda: r(c, kv_rank=3 if c.rank != 3 else 4),
        "2-D": lambda: r(c, rank=2, kv_rank=None, mask=None),
        "batch differs": lambda: r(c, kv_batch=tuple(b + 1 for b in c.batch)),
        "batch broadcast": lambda: r(c, kv_batch=(1,) * len(c.batch), batch=tuple(max(2, b) for b in c.batch)),
        "mask + is_causal": lambda: r(c, mask=m, is_causal=True),
        "bad mask shape": lambda: r(c, mask=dataclasses.replace(m, bad=(-1, 1))),
        "bad mask Lq": lambda: r(c, mask=dataclasses.replace(m, bad=(-2, 2))),
        "mask too many dims": lambda: r(c, mask=dataclasses.replace(m, dims=(True,) * 6)),
        "int mask": lambda: r(c, mask=dataclasses.replace(m, kind="float", dtype="int64", grad=False)),
        "float64 mask": lambda: r(c, mask=dataclasses.replace(m, kind="float", dtype="float64", grad=False)),
        "float16 mask": lambda: r(c, mask=dataclasses.replace(m, kind="float", dtype="float16", grad=False)),
        "CausalBias + is_causal": lambda: r(c, mask=Mask(kind="causal_lr"), is_causal=True),
        "CausalBias of other lengths": lambda: r(c, mask=Mask(kind="causal_lr", bad=(1, 2))),
        "dropout None": lambda: r(c, dropout_p=None),
        "dropout 1": lambda: r(c, dropout_p=1.0),
        "dropout negative": lambda: r(c, dropout_p=-0.1),
        "scale str": lambda: r(c, scale="x"),
        "scale nan": lambda: r(c, scale=math.nan),
        "scale inf": lambda: r(c, scale=math.inf),
        "is_causal str": lambda: r(c, is_causal="yes"),
        "is_causal int": lambda: r(c, is_causal=1),
        "enable_gqa int": lambda: r(c, enable_gqa=1),
    }


INVALID_KINDS = tuple(_invalid_changes(Case()))


@st.composite
def invalid_cases(draw, winners: tuple = ("math", "math", "flash", "tune")) -> Case:
    base = draw(valid_cases(dropout=False, winners=winners))
    change = draw(st.sampled_from(INVALID_KINDS))
    return _invalid_changes(base)[change]()


#: What the second call of a pair changes; the fast key holds shapes, q dtype, mask signature and flags only.
PAIR_KINDS = ("strides", "value length", "value dim", "k/v dtype", "mask values", "mask layout", "scale",
              "grad mode", "k/v requires_grad", "argument types", "autocast", "forward AD")


@st.composite
def pairs(draw, winners: tuple = ("math", "math", "flash", "tune")) -> tuple[Case, Case]:
    first = draw(valid_cases(dropout=False, winners=winners))
    kind = draw(st.sampled_from(PAIR_KINDS))
    r = dataclasses.replace
    c = first
    if kind == "strides":
        second = r(c, layouts=tuple(draw(layouts(c.rank)) for _ in range(3)))
    elif kind == "value length":
        second = r(c, lv=c.lk + draw(st.sampled_from([1, 2])))
    elif kind == "value dim":
        second = r(c, dv=draw(head_dims))
    elif kind == "k/v dtype":
        others = [t for t in FLOATS if t != c.dtypes[1]]
        which = draw(st.sampled_from([1, 2]))
        dts = list(c.dtypes)
        dts[which] = draw(st.sampled_from(others))
        second = r(c, dtypes=tuple(dts))
    elif kind in ("mask values", "mask layout"):
        m = c.mask if c.mask is not None and c.mask.kind in ("bool", "float") else None
        if m is None:
            second = r(c, seed=c.seed + 1)
        elif kind == "mask values":
            second = r(c, seed=c.seed + 1, mask=r(m, p=draw(st.sampled_from([0.0, 0.5, 0.95, 1.0]))))
        else:
            second = r(c, mask=r(m, layout=draw(layouts(len(m.dims)))))
    elif kind == "scale":
        second = r(c, scale=draw(scales))
    elif kind == "grad mode":
        second = r(c, grad_mode=draw(st.sampled_from(["grad", "no_grad", "inference"])),
                   grads=c.grads if any(c.grads) else (False, True, False))
    elif kind == "k/v requires_grad":
        second = r(c, grads=(c.grads[0], draw(st.booleans()), draw(st.booleans())))
    elif kind == "autocast":
        second = r(c, autocast=draw(st.sampled_from(["bfloat16", "float16"])))
    elif kind == "forward AD":
        second = r(c, grad_mode="forward", grads=(False,) * 3)
    else:
        second = r(c, is_causal=int(c.is_causal), dropout_p=int(c.dropout_p) if not c.dropout_p else c.dropout_p,
                   enable_gqa=int(c.enable_gqa), scale=draw(st.sampled_from([None, 1, 2])))
    return first, second


# -- shrinking (for the script's reports) ---------------------------------------------------------------------

def simpler(case: Case):
    """Candidate simplifications of ``case``, simplest first (each changes one thing)."""
    r = dataclasses.replace
    for name, value in (("mask", None), ("dropout_p", 0.0), ("scale", None), ("is_causal", False),
                        ("enable_gqa", False), ("grad_mode", "grad"), ("grads", (False,) * 3),
                        ("layouts", (PLAIN,) * 3), ("kv_batch", None), ("kv_rank", None), ("autocast", None),
                        ("flags", None), ("det", False)):
        if getattr(case, name) != value:
            yield r(case, **{name: value})
    for i in range(3):
        if not case.layouts[i].plain():
            lay = list(case.layouts)
            for simpler_layout in (PLAIN, r(lay[i], step=None), r(lay[i], expand=()), r(lay[i], perm=None)):
                lay[i] = simpler_layout
                yield r(case, layouts=tuple(lay))
        if case.grads[i]:
            yield r(case, grads=tuple(g and j != i for j, g in enumerate(case.grads)))
    if case.mask is not None:
        m = case.mask
        yield r(case, mask=r(m, layout=PLAIN, grad=False))
        if m.kind in ("bool", "float") and len(m.dims) > 2:
            yield r(case, mask=r(m, dims=m.dims[1:]))
        yield r(case, mask=r(m, dims=tuple(False if i < len(m.dims) - 2 else d for i, d in enumerate(m.dims))))
    if case.rank > 4:
        yield r(case, rank=4, batch=case.batch[:1], layouts=(PLAIN,) * 3)
    yield r(case, batch=(1,) * len(case.batch))
    for f in ("hq", "hk", "hv", "lq", "lk", "lv", "d", "dk", "dv"):
        for smaller in sorted({1, 2, getattr(case, f) // 2, getattr(case, f) - 1}):
            if 0 <= smaller < getattr(case, f):
                yield _same_relation(case, f, smaller)
    if case.seed:
        yield r(case, seed=0)


def _same_relation(case: Case, field: str, value: int) -> Case:
    """Change ``field``, and the fields that equal it in the same group, so valid relations stay valid."""
    groups = (("hq", "hk", "hv"), ("lk", "lv"), ("d", "dk", "dv"), ("lq",))
    old = getattr(case, field)
    group = next(g for g in groups if field in g)
    return dataclasses.replace(case, **{f: value for f in group if getattr(case, f) == old})


def shrink(case: Case, still_fails: Callable[[Case], bool], budget: int = 300) -> Case:
    """Greedy: take the first simpler case that still fails, until none does (or ``budget`` checks)."""
    tries = 0
    improved = True
    while improved and tries < budget:
        improved = False
        for cand in simpler(case):
            if cand == case:
                continue
            tries += 1
            try:
                ok = still_fails(cand)
            except Exception:  # noqa: BLE001 - a candidate the builder cannot make
                ok = False
            if ok:
                case, improved = cand, True
                break
            if tries >= budget:
                break
    return case


def shrink_pair(pair: tuple, still_fails: Callable[[tuple], bool], budget: int = 300) -> tuple:
    """``shrink`` for a pair: each simplification of the first call is made to the second call too, except
    in the fields where the second call differs (what the pair is about)."""
    first, second = pair
    names = [f.name for f in dataclasses.fields(Case)]
    own = {n for n in names if getattr(first, n) != getattr(second, n)}

    def follow(cand: Case) -> tuple:
        changed = {n: getattr(cand, n) for n in names if n not in own and getattr(cand, n) != getattr(first, n)}
        return cand, dataclasses.replace(second, **changed)

    def fails(cand: Case) -> bool:
        return still_fails(follow(cand))

    return follow(shrink(first, fails, budget))


# -- themes (the script's mix) and known differences ----------------------------------------------------------

def themed_cases(weights: dict | None = None):
    """(theme, case) with theme "valid", "invalid" or "pairs" (a pair of cases), mixed by ``weights``."""
    weights = weights or {"valid": 5, "invalid": 2, "pairs": 3}
    make = {"valid": valid_cases, "invalid": invalid_cases, "pairs": pairs}
    return weighted(*((w, make[t]().map(lambda c, t=t: (t, c))) for t, w in weights.items()))


def check_themed(theme: str, case) -> list[Failure]:
    return check_pair(*case) if theme == "pairs" else check(case)


#: From this |scale| on, fp32/fp16 rounding of the scores (they grow with the scale) separates PyTorch's unfused
#: math from its CPU flash by more than the dtype's tolerance: seen at |scale| 30 (math 1.4e-5 from float64,
#: flash 5.0e-6; 1.9e-5 apart at |out| 3.1) and, with the softmax saturated, at 1e4 (2.9e-4 apart at |out| 2.1).
LARGE_SCALE = 10.0
#: The most that difference may grow to (in tolerances of the dtype, relative to max(1, max |F.sdpa|)): a wrong
#: result (a wrong scale, 2 * out + 1) is thousands of tolerances off.
HUGE_SCALE_EXCESS = 200.0


def large_scale_allowance(scale: float) -> float:
    """Tolerances the large-scale difference may reach at ``scale``: in proportion to |scale| (the scores'
    rounding is), at least 2, at most HUGE_SCALE_EXCESS. 30 -> 3 (seen: 0.6), 1e4 -> 200 (seen: 14)."""
    return min(HUGE_SCALE_EXCESS, max(2.0, abs(scale) / LARGE_SCALE))


#: Differences found by fuzzing and left to fix: name -> (does this failure of this case match, why).
#: Each has a strict xfail repro in tests/test_fuzz.py; the fuzz tests skip the failures they match.
KNOWN: dict[str, tuple[Callable[[Case, Failure], bool], str]] = {
    "large scale": (
        lambda c, f: isinstance(c.scale, (int, float)) and abs(c.scale) >= LARGE_SCALE
        and f.kind in ("values", "grads") and f.excess <= large_scale_allowance(c.scale),
        f"with |scale| >= {LARGE_SCALE:g} a math plan (the key leaves scale out) is further from float64 than "
        "PyTorch's CPU flash at fp32/fp16: the scores grow with the scale and math's unfused rounding shows (up "
        f"to |scale|/{LARGE_SCALE:g} tolerances, at least 2, at most {HUGE_SCALE_EXCESS:g}; beyond that it is a "
        "failure). autosdpa's output is then PyTorch's own math backend's"),
}


def known_reason(case: Case, failure: Failure) -> str | None:
    """The name of the known difference ``failure`` (of ``case``, or a pair's second call) is, if any."""
    for name, (matches, _why) in KNOWN.items():
        if matches(case, failure):
            return name
    return None


def known_for(theme: str, case, failure: Failure) -> str | None:
    """``known_reason`` for a themed case: a pair's failure is judged by the call it happened in."""
    if theme == "pairs":
        case = case[0] if failure.stage == "pair-first" else case[1]
    return known_reason(case, failure)
