"""The sweep: does autosdpa pay on this device? (``scripts/bench_sweep.py`` and ``autosdpa bench --sweep``).

For each problem of a fixed table (LLM prefill and decode with GQA, causal and KV-cache Lq != Lk; encoders with
and without padding masks; diffusion self- and cross-attention; training forward + backward; every dtype the
device runs well), side by side in one process with interleaved rounds:

- ``default``: PyTorch's own ``F.scaled_dot_product_attention``;
- ``backend:NAME``: each eligible backend alone, run as a plan runs it (the runner its backend object sets up
  for these inputs, ``backend.runner(call)``);
- ``autosdpa``: ``autosdpa.sdpa`` after its first-sight tuning, on a fresh database.

Ratios are medians of per-round paired ratios (both timed in the same round), so drift between rounds cancels.
*Noise* for one problem is half the interquartile range of its per-round ``autosdpa / default`` ratios; a
*regression* is a median ratio above ``1 + noise``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from .forms import synthetic_call
from .problem import Problem
from .timing import round_order
from .workload import parse_shape

#: The GPU targets of issue 10 (the oracle is the fastest single backend on each problem).
GPU_TARGETS = {"within_oracle": 1.02, "geomean_speedup": 1.10, "regressions": 0, "first_sight_ms": 50.0}
#: CPU target: the first call of a problem costs at most its tuning budget plus this many plain calls.
FIRST_CALL_PLAIN_CALLS = 10


@dataclasses.dataclass(frozen=True)
class SweepProblem:
    name: str    # e.g. "llm-prefill gqa causal fp32"
    family: str  # llm-prefill | llm-decode | encoder | diffusion | training
    spec: str    # a shape spec (``autosdpa tune --shape``)

    @property
    def problem(self) -> Problem:
        return parse_shape(self.spec, default_dtype="fp32")


def _p(family: str, name: str, spec: str) -> SweepProblem:
    return SweepProblem(f"{family}: {name}", family, spec)


# Sized so that one PyTorch call takes ~1-20 ms on a quiet 2-core CPU (well under 50 ms).
CPU_TABLE = (
    _p("llm-prefill", "GQA 8/2 causal L=256 fp32", "b=1,hq=8,hkv=2,lq=256,d=64,causal,dtype=fp32"),
    _p("llm-prefill", "GQA 8/2 causal L=256 bf16", "b=1,hq=8,hkv=2,lq=256,d=64,causal,dtype=bf16"),
    _p("llm-decode", "GQA 8/2 Lq=1 Lk=1024 B=4 fp32", "b=4,hq=8,hkv=2,lq=1,lk=1024,d=64,dtype=fp32"),
    _p("llm-decode", "MHA 8 Lq=1 Lk=2048 fp32", "b=1,hq=8,lq=1,lk=2048,d=64,dtype=fp32"),
    _p("llm-prefill", "KV cache Lq=32 Lk=1024 causal-br fp32", "b=1,hq=8,hkv=2,lq=32,lk=1024,d=64,causal=br,dtype=fp32"),
    _p("encoder", "ViT-B/16 B=4 L=197 fp32", "b=4,hq=12,lq=197,d=64,dtype=fp32"),
    _p("encoder", "ViT-B/16 B=4 L=197 bf16", "b=4,hq=12,lq=197,d=64,dtype=bf16"),
    _p("encoder", "BERT B=4 L=128 bool padding mask fp32", "b=4,hq=12,lq=128,d=64,mask=bool:B11K,dtype=fp32"),
    _p("encoder", "BERT B=4 L=128 float padding mask fp32", "b=4,hq=12,lq=128,d=64,mask=float:B11K,dtype=fp32"),
    _p("diffusion", "self L=1024 D=64 fp32", "b=1,hq=8,lq=1024,d=64,dtype=fp32"),
    _p("diffusion", "cross Lq=1024 Lk=77 D=64 fp32", "b=1,hq=8,lq=1024,lk=77,d=64,dtype=fp32"),
    _p("training", "GPT-2 causal L=256 fwd+bwd fp32", "b=1,hq=12,lq=256,d=64,causal,train,dtype=fp32"),
    _p("training", "ViT B=2 L=197 fwd+bwd fp32", "b=2,hq=12,lq=197,d=64,train,dtype=fp32"),
)
CPU_QUICK = (0, 2, 5, 7, 11)

# H100/H200: ~3 minutes for the whole table including first-sight tuning.
CUDA_TABLE = (
    _p("llm-prefill", "Llama-3-8B GQA 32/8 causal L=4096 bf16",
       "b=1,hq=32,hkv=8,lq=4096,d=128,causal,dtype=bf16"),
    _p("llm-prefill", "GQA 32/8 causal B=4 L=2048 fp16", "b=4,hq=32,hkv=8,lq=2048,d=128,causal,dtype=fp16"),
    _p("llm-decode", "GQA 32/8 Lq=1 Lk=8192 B=8 bf16", "b=8,hq=32,hkv=8,lq=1,lk=8192,d=128,dtype=bf16"),
    _p("llm-decode", "GQA 32/8 Lq=1 Lk=2048 B=1 bf16", "b=1,hq=32,hkv=8,lq=1,lk=2048,d=128,dtype=bf16"),
    _p("llm-prefill", "KV cache Lq=512 Lk=8192 causal-br bf16",
       "b=1,hq=32,hkv=8,lq=512,lk=8192,d=128,causal=br,dtype=bf16"),
    _p("encoder", "ViT-B/16 B=64 L=197 fp16", "b=64,hq=12,lq=197,d=64,dtype=fp16"),
    _p("encoder", "ViT-B/16 B=64 L=197 fp32", "b=64,hq=12,lq=197,d=64,dtype=fp32"),
    _p("encoder", "BERT-base B=32 L=512 bool padding mask fp16", "b=32,hq=12,lq=512,d=64,mask=bool:B11K,dtype=fp16"),
    _p("encoder", "BERT-base B=32 L=512 float padding mask bf16",
       "b=32,hq=12,lq=512,d=64,mask=float:B11K,dtype=bf16"),
    _p("diffusion", "SD self B=2 L=4096 D=64 fp16", "b=2,hq=8,lq=4096,d=64,dtype=fp16"),
    _p("diffusion", "long self B=1 L=16384 D=64 bf16", "b=1,hq=16,lq=16384,d=64,dtype=bf16"),
    _p("diffusion", "SD cross Lq=4096 Lk=77 D=64 fp16", "b=2,hq=8,lq=4096,lk=77,d=64,dtype=fp16"),
    _p("training", "GPT-2 causal B=8 L=1024 fwd+bwd bf16", "b=8,hq=12,lq=1024,d=64,causal,train,dtype=bf16"),
    _p("training", "Llama GQA 32/8 causal L=4096 fwd+bwd bf16",
       "b=1,hq=32,hkv=8,lq=4096,d=128,causal,train,dtype=bf16"),
    _p("training", "ViT B=64 L=197 fwd+bwd fp16", "b=64,hq=12,lq=197,d=64,train,dtype=fp16"),
)
CUDA_QUICK = (0, 2, 4, 5, 7, 9, 12)


def dry_problem(p: Problem) -> Problem:
    """A tiny problem of the same kind (flags, dtype, masks, GQA ratio), for checking that the sweep runs."""
    lq = p.lq if p.lq == 1 else min(p.lq, 8 + p.lq % 7)
    lk = lq if p.lk == p.lq else min(p.lk, 16 + p.lk % 5)  # self-attention stays self-attention
    return p.with_(batch=1, hq=p.hq // p.hkv, hkv=1, lq=lq, lk=lk, d=min(p.d, 16), dv=min(p.dv, 16))


def problem_table(device: torch.device, *, quick: bool = False) -> list[SweepProblem]:
    table, pick = (CUDA_TABLE, CUDA_QUICK) if device.type == "cuda" else (CPU_TABLE, CPU_QUICK)
    return [table[i] for i in pick] if quick else list(table)


# -- calls under test -----------------------------------------------------------------------------------------

def padding_mask(call, seed: int = 0):
    """A (B, 1, 1, K) mask that hides a random-length tail per batch row, as a tokenizer's padding does
    (bool: True = attend; float: 0 or the dtype's minimum, as Hugging Face builds it). Else the call's mask."""
    m = call.dense_mask
    if m is None or m.dim() != 4 or tuple(m.shape[1:3]) != (1, 1) or m.shape[0] != call.query.shape[0]:
        return call.attn_mask
    g = torch.Generator().manual_seed(seed)
    lk = m.shape[-1]
    keep = torch.randint(max(1, lk // 2), lk + 1, (m.shape[0],), generator=g)
    attend = (torch.arange(lk)[None, :] < keep[:, None]).view(m.shape[0], 1, 1, lk).to(m.device)
    if m.dtype == torch.bool:
        return attend
    return torch.zeros(m.shape, dtype=m.dtype, device=m.device).masked_fill(~attend, torch.finfo(m.dtype).min)


def make_runner(fn, call, attn_mask, train: bool) -> Callable[[], object]:
    """A no-argument function running ``fn`` on the call: forward under no_grad, or forward + backward."""
    kw = dict(dropout_p=call.dropout_p, is_causal=call.is_causal, scale=call.scale, enable_gqa=call.enable_gqa)
    q, k, v = (t.detach() for t in (call.query, call.key, call.value))
    if not train:
        def run():
            with torch.no_grad():
                return fn(q, k, v, attn_mask, **kw)
        return run
    xs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(*q.shape[:-1], v.shape[-1], generator=gen).to(q.device, q.dtype)

    def run_train():
        out = fn(*xs, attn_mask, **kw)
        return torch.autograd.grad(out, xs, grad)
    return run_train


def backend_fn(name: str):
    """``F.sdpa``'s signature, run by one backend object alone as a plan runs it: through the runner set up on
    the first call with each set of input tensors and grad mode (a benchmark calls it on fixed inputs)."""
    from . import backends
    from .backends.base import Call, safe_runner
    from .forms import needs_grad

    b = backends.get(name)
    runners: dict = {}  # (ids of the inputs, grad needed) -> (runner, the inputs: alive, so no id is reused)

    def fn(q, k, v, m=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        grad = needs_grad(q, k, v)
        key = (id(q), id(k), id(v), id(m), grad)
        got = runners.get(key)
        if got is None:
            got = runners[key] = (safe_runner(b, Call(q, k, v, m, dropout_p, is_causal, scale, enable_gqa, grad)),
                                  (q, k, v, m))
        return got[0](q, k, v, m, dropout_p, is_causal, scale, enable_gqa)
    return fn


# -- timing -----------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _reps(fn, sync, sample_s: float) -> int:
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return max(1, min(10_000, int(sample_s / max(time.perf_counter() - t0, 1e-7))))


def time_side_by_side(fns: dict[str, Callable[[], object]], device: torch.device, *, seconds: float = 1.0,
                      min_rounds: int = 15, max_rounds: int = 400, sample_s: float = 2e-3
                      ) -> dict[str, list[float]]:
    """Per-call seconds of each function, one sample each per round, in a new order every round (``round_order``).

    A sample is back-to-back calls (enough for ~``sample_s``) then a device sync: what a caller pays,
    host overhead included; no cache flush between calls."""
    sync = _sync(device)
    reps = {n: _reps(fn, sync, sample_s) for n, fn in fns.items()}
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(max_rounds):
        for n in round_order(names, r):
            fn, k = fns[n], reps[n]
            sync()
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            sync()
            samples[n].append((time.perf_counter() - t0) / k)
        if r + 1 >= min_rounds and time.perf_counter() - start > seconds:
            break
    return samples


def stats(xs: list[float]) -> dict:
    """median, p25, p75, min and count of samples."""
    if len(xs) >= 4:
        q = statistics.quantiles(xs, n=4)
        p25, p75 = q[0], q[2]
    else:
        p25, p75 = min(xs), max(xs)
    return {"median": statistics.median(xs), "p25": p25, "p75": p75, "min": min(xs), "n": len(xs)}


def paired_ratio(a: list[float], b: list[float]) -> dict:
    """Stats of the per-round ratios a[i] / b[i] (both sampled in round i), plus ``noise``: half their IQR."""
    s = stats([x / y for x, y in zip(a, b)])
    s["noise"] = (s["p75"] - s["p25"]) / 2
    return s


def geomean(xs) -> float | None:
    xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


# -- one problem --------------------------------------------------------------------------------------------------

def _check_backends(call, mask, device) -> tuple[list[str], dict[str, str], dict[str, float | None]]:
    """(eligible backends that match the reference, rejected {name: why}, max error {name: error})."""
    from . import backends
    from .eligibility import eligibility, reasons_text
    from .reference import max_error, reference_attention, tolerance

    c = dataclasses.replace(call, attn_mask=mask)
    cands = [b for b in backends.all_backends() if b.candidate_by_default(device)]
    elig = eligibility(c, cands)
    rejected = reasons_text(elig)
    q, k, v = (t.detach() for t in (c.query, c.key, c.value))
    with torch.no_grad():
        ref = reference_attention(dataclasses.replace(c, query=q, key=k, value=v))
    ok, errors = [], {}
    for name in (n for n, why in elig.items() if not why):
        try:
            with torch.no_grad():
                out = backend_fn(name)(q, k, v, mask, c.dropout_p, c.is_causal, c.scale, c.enable_gqa)
            errors[name] = max_error(out, ref)
        except Exception as e:  # a backend that fails here is reported, not timed
            rejected[name] = f"{type(e).__name__}: {e}"[:300]
            continue
        if errors[name] <= tolerance(c):
            ok.append(name)
        else:
            rejected[name] = f"error {errors[name]:.3g} vs reference exceeds {tolerance(c):.3g}"
    return ok, rejected, errors


def _explain(call, mask, train: bool):
    """autosdpa's decision for exactly the tensors the sweep times (grad-requiring inputs when training)."""
    import autosdpa

    xs = [t.detach() for t in (call.query, call.key, call.value)]
    if train:
        xs = [t.clone().requires_grad_() for t in xs]
    return autosdpa.explain(*xs, mask, call.dropout_p, call.is_causal, call.scale, call.enable_gqa)


def run_problem(sp: SweepProblem, device: torch.device, *, dry: bool = False, seconds: float = 1.0,
                min_rounds: int = 15) -> dict:
    """First-sight cost, then default vs every eligible backend vs autosdpa, side by side."""
    import autosdpa

    from .dispatch import pytorch_sdpa

    prob = dry_problem(sp.problem) if dry else sp.problem
    call = synthetic_call(prob, device)
    mask = padding_mask(call)
    sync = _sync(device)
    default = make_runner(pytorch_sdpa, call, mask, prob.train)
    ours = make_runner(autosdpa.sdpa, call, mask, prob.train)
    default(), default()  # PyTorch's own first-call costs for this shape are not autosdpa's
    sync()
    t0 = time.perf_counter()
    ours()
    sync()
    first_s = time.perf_counter() - t0
    d = _explain(call, mask, prob.train)
    ok, rejected, errors = _check_backends(call, mask, device)
    fns = {"default": default, "autosdpa": ours}
    fns.update({f"backend:{n}": make_runner(backend_fn(n), call, mask, prob.train) for n in ok})
    samples = time_side_by_side(fns, device, seconds=seconds, min_rounds=min_rounds)
    oracle = min(ok, key=lambda n: statistics.median(samples[f"backend:{n}"])) if ok else None
    default_med = statistics.median(samples["default"])
    vs_default = paired_ratio(samples["autosdpa"], samples["default"])
    row = {"name": sp.name, "family": sp.family, "spec": sp.spec, "problem": prob.key, "dtype": prob.dtype,
           "train": prob.train, "inference": not prob.train, "loadavg": os.getloadavg(),
           "first_sight_s": first_s, "first_sight_calls": first_s / default_med,
           "autosdpa_backend": d.backend, "autosdpa_source": d.source, "autosdpa_reason": d.reason,
           "pytorch_choice": d.pytorch_choice, "tuning_timings_s": d.timings, "rejected": rejected,
           "max_error": errors, "oracle": oracle, "rounds": len(samples["default"]),
           "timings_s": {n: stats(s) for n, s in samples.items()},
           "autosdpa_vs_default": vs_default,
           "autosdpa_vs_oracle": paired_ratio(samples["autosdpa"], samples[f"backend:{oracle}"]) if oracle else None,
           "oracle_vs_default": paired_ratio(samples[f"backend:{oracle}"], samples["default"]) if oracle else None}
    row["regression"] = vs_default["median"] > 1 + vs_default["noise"]
    # fastest samples: what each costs undisturbed, given enough samples (reported beside the median ratio)
    row["autosdpa_vs_default_of_minima"] = min(samples["autosdpa"]) / min(samples["default"])
    return row


# -- hot path -----------------------------------------------------------------------------------------------------

def hot_path_overhead(device: torch.device, *, rounds: int = 200, calls: int = 500) -> dict:
    """Added time per cache hit over F.sdpa at B=1 H=1 L=8 D=8 (fp32): the median of per-round differences,
    rounds interleaved with the order alternating (as ``scripts/bench_overhead.py``)."""
    import autosdpa

    from .dispatch import pytorch_sdpa

    x = torch.randn(1, 1, 8, 8, device=device)
    autosdpa.sdpa(x, x, x)  # first sight: decided here, not timed
    sync = _sync(device)
    contenders = {"torch": pytorch_sdpa, "autosdpa": autosdpa.sdpa}

    def per_call(name):
        fn = contenders[name]
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(x, x, x)
        sync()
        return (time.perf_counter() - t0) / calls

    for _ in range(3):
        per_call("torch"), per_call("autosdpa")
    got: dict[str, list[float]] = {"torch": [], "autosdpa": []}
    for r in range(rounds):
        for name in (("torch", "autosdpa") if r % 2 == 0 else ("autosdpa", "torch")):
            got[name].append(per_call(name))
    diffs = [a - b for a, b in zip(got["autosdpa"], got["torch"])]
    d = stats(diffs)
    return {"case": "fp32 B=1 H=1 L=8 D=8", "winner": autosdpa.explain(x, x, x).backend,
            "torch_us": statistics.median(got["torch"]) * 1e6, "autosdpa_us": statistics.median(got["autosdpa"]) * 1e6,
            "overhead_us": d["median"] * 1e6, "overhead_p25_us": d["p25"] * 1e6, "overhead_p75_us": d["p75"] * 1e6,
            "overhead_of_minima_us": (min(got["autosdpa"]) - min(got["torch"])) * 1e6, "rounds": rounds,
            "calls_per_sample": calls, "loadavg": os.getloadavg()}


# -- the whole sweep ----------------------------------------------------------------------------------------------

def machine_info(device: torch.device) -> dict:
    import importlib.metadata as md
    import sys

    from .environment import environment

    v = {"python": sys.version.split()[0], "torch": torch.__version__}
    for pkg in ("autosdpa", "triton", "sqlalchemy", "transformers"):
        with contextlib.suppress(md.PackageNotFoundError):
            v[pkg] = md.version(pkg)
    if device.type == "cuda":
        v.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    _fp, info = environment(device)
    return {"device": str(device), "device_name": info.get("device_name"), "hostname": platform.node(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "capability": info.get("capability"), "versions": v}


def _settings(db: str, budget_s: float | None):
    from .config import Settings

    s = dataclasses.replace(Settings.from_env(), db=db, mode="tune", record=None)
    return dataclasses.replace(s, budget_s=budget_s) if budget_s is not None else s


def run_sweep(device: torch.device | str = "cpu", *, quick: bool = False, dry: bool = False,
              seconds: float | None = None, budget_s: float | None = None, db: str | None = None,
              hot_rounds: int | None = None, progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Run the sweep on a fresh database (``db``, which must not exist yet, or a temporary file) and return the
    result document (machine, versions, date, load average, every timing with its spread, summary, targets).
    The dispatcher's settings are restored afterwards."""
    from .dispatch import dispatcher

    device = torch.device(device)
    if db is not None and Path(db).exists():
        raise FileExistsError(f"{db} exists: the sweep measures first-sight tuning on a fresh database")
    table = problem_table(device, quick=quick)
    if seconds is None:
        seconds = 0.0 if dry else (2.0 if device.type == "cuda" else 1.5) * (0.5 if quick else 1.0)
    min_rounds = 3 if dry else 15
    if dry and budget_s is None:
        budget_s = 0.02  # checks that the sweep runs, not how fast anything is
    prev = dispatcher.settings
    with tempfile.TemporaryDirectory(prefix="autosdpa-sweep-") as tmp:
        settings = _settings(db or str(Path(tmp) / "sweep.sqlite"), budget_s)
        dispatcher.configure(settings)
        try:
            load0 = os.getloadavg()
            import autosdpa  # the store and the environment are opened once per process: not any problem's cost

            x = torch.randn(1, 1, 4, 8, device=device)
            autosdpa.sdpa(x, x, x)
            results = []
            for i, sp in enumerate(table):
                if progress:
                    progress(i, len(table), sp.name)
                results.append(run_problem(sp, device, dry=dry, seconds=seconds, min_rounds=min_rounds))
            if progress:
                progress(len(table), len(table), "hot path")
            hot = hot_path_overhead(device, rounds=hot_rounds or (5 if dry else 200), calls=50 if dry else 500)
        finally:
            dispatcher.configure(prev)
    doc = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(device),
           "loadavg_start": load0, "loadavg_end": os.getloadavg(), "quick": quick, "dry": dry,
           "seconds_per_problem": seconds, "min_rounds": min_rounds, "budget_s": settings.budget_s,
           "shared_layers": list(settings.all_shared_dbs()), "db": db,
           "method": METHOD, "results": results, "hot_path": hot}
    doc["summary"] = summarize(results, hot, settings.budget_s)
    doc["targets"] = targets(doc)
    return doc


METHOD = ("Side by side in one process: each round samples every contender once, in a new random order every "
          "round; a sample is back-to-back calls then a device sync. 'backend:X' runs backend X's object alone, as "
          "a plan runs it (the runner autosdpa.backends.get(X).runner(call) sets up for these inputs). autosdpa is "
          "autosdpa.sdpa after its first call on a fresh database (first_sight_s: that first call, tuning "
          "included). Ratios are medians of per-round paired ratios (time / time: below 1 is faster); noise = half "
          "the IQR of the per-round autosdpa/default ratios; regression = median ratio > 1 + noise. oracle = the "
          "fastest single backend on that problem. 'of minima': the ratio of each contender's fastest sample (an "
          "estimate of the undisturbed cost; with few samples under heavy load it is itself noisy).")


def summarize(results: list[dict], hot: dict, budget_s: float) -> dict:
    vs_def = [r["autosdpa_vs_default"]["median"] for r in results]
    vs_orc = [r["autosdpa_vs_oracle"]["median"] for r in results if r["autosdpa_vs_oracle"]]
    inf = [r for r in results if r["inference"]]
    return {"problems": len(results),
            "autosdpa_vs_default_geomean": geomean(vs_def),
            "speedup_over_default_geomean": 1 / g if (g := geomean(vs_def)) else None,
            "oracle_speedup_over_default_geomean": 1 / g if (g := geomean(
                [r["oracle_vs_default"]["median"] for r in results if r["oracle_vs_default"]])) else None,
            "autosdpa_vs_oracle_geomean": geomean(vs_orc), "autosdpa_vs_oracle_worst": max(vs_orc, default=None),
            "autosdpa_vs_default_of_minima_geomean": geomean([r.get("autosdpa_vs_default_of_minima") for r in results]),
            "regressions": [r["name"] for r in results if r["regression"]],
            "first_sight_ms_max_inference": max((r["first_sight_s"] * 1e3 for r in inf), default=None),
            "first_sight_ms_median": statistics.median([r["first_sight_s"] * 1e3 for r in results]) if results else None,
            "first_sight_excess_worst_s": max((first_call_excess(r, budget_s) for r in results), default=None),
            "hot_path_overhead_us": hot["overhead_us"]}


def first_call_excess(row: dict, budget_s: float) -> float:
    """Seconds by which a first call exceeded the CPU target (budget + 10 plain calls); <= 0 is met."""
    plain = row["timings_s"]["default"]["median"]
    return row["first_sight_s"] - (budget_s + FIRST_CALL_PLAIN_CALLS * plain)


def targets(doc: dict) -> list[dict]:
    """[{target, applies, goal, measured, met}] for the issue's GPU targets and the CPU first-call target."""
    s, budget = doc["summary"], doc["budget_s"]
    t = GPU_TARGETS
    worst_excess = s["first_sight_excess_worst_s"] or 0.0
    rows = [
        ("within 2% of the oracle on every problem", "cuda", f"≤ {t['within_oracle']:.2f}×",
         s["autosdpa_vs_oracle_worst"], lambda v: v is not None and v <= t["within_oracle"], "{:.3f}× (worst)"),
        ("geomean speedup over PyTorch's default", "cuda", f"≥ {t['geomean_speedup']:.2f}×",
         s["speedup_over_default_geomean"], lambda v: v is not None and v >= t["geomean_speedup"], "{:.3f}×"),
        ("regressions beyond noise", "all", "0", len(s["regressions"]), lambda v: v <= t["regressions"], "{}"),
        ("first-sight per inference problem", "cuda", f"≤ {t['first_sight_ms']:.0f} ms",
         s["first_sight_ms_max_inference"], lambda v: v is not None and v <= t["first_sight_ms"], "{:.1f} ms (worst)"),
        (f"first call ≤ budget ({budget:g} s) + {FIRST_CALL_PLAIN_CALLS} plain calls", "cpu", "excess ≤ 0 s",
         worst_excess, lambda v: v <= 0, "{:+.3f} s (worst excess)"),
        ("hot path added per cache hit", "cpu", "≤ 1.0 µs", s["hot_path_overhead_us"], lambda v: v <= 1.0,
         "{:.2f} µs"),
    ]
    dev = torch.device(doc["machine"]["device"]).type
    return [{"target": name, "applies": applies, "goal": goal, "measured": fmt.format(v) if v is not None else "-",
             "value": v, "met": bool(ok(v)), "on_this_device": applies in ("all", dev)}
            for name, applies, goal, v, ok, fmt in rows]
