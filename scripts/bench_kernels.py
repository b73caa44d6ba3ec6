#!/usr/bin/env python
"""Benchmark this project's Triton kernels against every PyTorch SDPA backend (CUDA only).

    python scripts/bench_kernels.py [--quick | --targets] [--out benchmarks/] [--rounds 20] [--bwd]

Timing: CUDA events around one call, L2 flushed before every call, warm-up first (this also runs Triton's
autotuning and cuDNN's plan building), candidates interleaved round by round (the order rotates), median
and inter-quartile spread reported. Every candidate's output is first checked against a float32 reference
computed on a slice (2 batches x 2 heads x up to 256 query rows); a backend that errors or mismatches is
recorded with its reason and not timed.

Writes ``<out>/kernels-<gpu>-<date>.json`` (machine, GPU, torch/triton/CUDA/cuDNN versions, date, all
results) and a markdown table next to it, and prints issue 8's targets, each with TFLOP/s and GB/s next
to its ratio (``--targets`` times just those problems):

* triton_flash fwd, bf16, D=128, causal, L = 2k and 8k: >= 1.1x PyTorch's flash backend and >= 0.8x the best
  PyTorch backend;
* masked GQA (bool padding mask, Hq=32, Hkv=8, L=2k, bf16): >= 2x the best PyTorch backend;
* triton_decode (Lq=1, Lk >= 8k, Hq=32, Hkv=8, B <= 8, bf16): >= 80% of HBM bandwidth (bytes of K and V read
  / time, against ~3.0 TB/s on the H100 and ~4.3 TB/s on the H200), with its ratio to PyTorch's best.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import sys
import warnings

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_BACKENDS = ("math", "flash", "efficient", "cudnn")
MATH_LIMIT_GIB = 24.0  # skip the math backend when its scores would take more (--targets: 0.5)
OURS = ("triton_flash", "triton_decode")


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------
def _case(group, B, Hq, Hkv, Lq, Lk, D, dtype="bf16", causal="none", mask="none"):
    return dict(group=group, B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, dtype=dtype, causal=causal, mask=mask)


def target_cases() -> list[dict]:
    """Exactly the problems issue 8's targets name."""
    return ([_case("prefill", 32768 // L, 16, 16, L, L, 128, causal="top_left") for L in (2048, 8192)]
            + [_case("masked_gqa", 8, 32, 8, 2048, 2048, 128, mask="padding")]
            + [_case("decode", B, 32, 8, 1, Lk, 128) for Lk in (8192, 32768) for B in (1, 8)])


def build_cases(quick: bool, targets_only: bool = False) -> list[dict]:
    if targets_only:
        return target_cases()
    cases = []
    total = 32768                                       # B * L roughly constant
    lens = (2048, 8192) if quick else (512, 2048, 8192, 32768)
    dims = (128,) if quick else (64, 128, 256)
    for D in dims:
        H = 2048 // D
        for L in lens:
            for causal in ("none", "top_left"):
                cases.append(_case("prefill", max(1, total // L), H, H, L, L, D, causal=causal))
    for L in ((2048,) if quick else (1024, 2048, 4096)):
        cases.append(_case("masked_gqa", max(1, 16384 // L), 32, 8, L, L, 128, mask="padding"))
    for Lk in ((8192, 32768) if quick else (8192, 32768, 131072)):
        for B in ((1, 8) if quick else (1, 4, 8)):
            cases.append(_case("decode", B, 32, 8, 1, Lk, 128))
    if not quick:
        cases.append(_case("decode", 4, 32, 8, 4, 32768, 128, causal="bottom_right"))
    cases.append(_case("big_d", 2, 8, 8, 2048, 2048, 512))
    if not quick:
        cases.append(_case("big_d", 2, 8, 8, 2048, 2048, 512, causal="top_left"))
    cases.append(_case("fp32", 4, 16, 16, 2048, 2048, 128, dtype="fp32"))
    if not quick:
        cases.append(_case("fp32", 4, 16, 16, 2048, 2048, 128, dtype="fp32", causal="top_left"))
    return cases


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def case_name(c) -> str:
    s = (f"{c['group']} {c['dtype']} B={c['B']} Hq={c['Hq']} Hkv={c['Hkv']} Lq={c['Lq']} Lk={c['Lk']} "
         f"D={c['D']}")
    if c["causal"] != "none":
        s += f" causal={c['causal']}"
    if c["mask"] != "none":
        s += f" mask={c['mask']}"
    return s


def make_inputs(c, device, requires_grad=False):
    dt = DTYPES[c["dtype"]]
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(c["B"], c["Hq"], c["Lq"], c["D"], device=device, dtype=dt, generator=g)
    k = torch.randn(c["B"], c["Hkv"], c["Lk"], c["D"], device=device, dtype=dt, generator=g)
    v = torch.randn(c["B"], c["Hkv"], c["Lk"], c["D"], device=device, dtype=dt, generator=g)
    mask = None
    if c["mask"] == "padding":
        # each sequence keeps a different prefix of the keys: (B, 1, 1, Lk) bool, True = attend
        keep = torch.linspace(0.5, 1.0, c["B"], device=device) * c["Lk"]
        mask = (torch.arange(c["Lk"], device=device)[None, :] < keep[:, None].ceil())[:, None, None, :]
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v, mask


def min_bytes(c) -> float:
    """Bytes every kernel must move at least once (q, k, v, out): the memory-bound view used for decode."""
    es = DTYPES[c["dtype"]].itemsize
    return es * (2 * c["B"] * c["Hq"] * c["Lq"] * c["D"] + 2 * c["B"] * c["Hkv"] * c["Lk"] * c["D"])


def flops(c, with_bwd=False) -> float:
    """Dense attention FLOPs (masks are not discounted; causal counts only the visible pairs)."""
    Lq, Lk = c["Lq"], c["Lk"]
    if c["causal"] == "none":
        pairs = Lq * Lk
    else:
        off = (Lk - Lq) if c["causal"] == "bottom_right" else 0
        # sum_i clamp(i + off + 1, 0, Lk)
        pairs = sum(min(Lk, max(0, i + off + 1)) for i in range(Lq)) if Lq <= 65536 else Lq * Lk / 2
    f = 4.0 * c["B"] * c["Hq"] * pairs * c["D"]
    return f * (3.5 if with_bwd else 1.0)


# ------------------------------------------------------------------------------------------------
# reference on a slice
# ------------------------------------------------------------------------------------------------
def slice_spec(c):
    bs = sorted({0, c["B"] - 1})
    hs = sorted({0, c["Hq"] - 1})
    rows = list(range(min(128, c["Lq"]))) + list(range(max(128, c["Lq"] - 128), c["Lq"]))
    return bs, hs, torch.tensor(sorted(set(rows)))


def reference_slice(c, q, k, v, mask, spec):
    bs, hs, rows = spec
    rows = rows.to(q.device)
    G = c["Hq"] // c["Hkv"]
    scale = 1.0 / math.sqrt(c["D"])
    out = torch.empty(len(bs), len(hs), len(rows), c["D"], device=q.device, dtype=torch.float32)
    cols = torch.arange(c["Lk"], device=q.device)
    for bi, b in enumerate(bs):
        for hi, h in enumerate(hs):
            qs = q[b, h, rows].float()
            ks, vs = k[b, h // G].float(), v[b, h // G].float()
            s = (qs @ ks.T) * scale
            vis = torch.ones_like(s, dtype=torch.bool)
            if c["causal"] != "none":
                off = (c["Lk"] - c["Lq"]) if c["causal"] == "bottom_right" else 0
                vis &= cols[None, :] <= rows[:, None] + off
            if mask is not None:
                mb = mask.expand(c["B"], c["Hq"], c["Lq"], c["Lk"])[b, h][rows]
                vis &= mb
            s = s.masked_fill(~vis, float("-inf"))
            p = torch.softmax(s, -1).nan_to_num(0.0)
            out[bi, hi] = p @ vs.float()
    return out


def check(out, ref, spec, dtype) -> tuple[bool, float]:
    bs, hs, rows = spec
    got = out[bs][:, hs][:, :, rows.to(out.device)].float()
    err = (got - ref).abs().max().item()
    tol = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype] * max(1.0, ref.abs().max().item())
    return bool(torch.isfinite(got).all()) and err <= tol, err


# ------------------------------------------------------------------------------------------------
# candidates
# ------------------------------------------------------------------------------------------------
def candidates(c, q, k, v, mask):
    """name -> (context-manager factory, callable, skip reason or None)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    gqa = c["Hq"] != c["Hkv"]
    if c["causal"] == "bottom_right":
        t_mask, t_causal = causal_lower_right(c["Lq"], c["Lk"]), False
    else:
        t_mask, t_causal = mask, c["causal"] == "top_left"
    enum = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    out = {}
    for name in TORCH_BACKENDS:
        skip = None
        if name == "math":
            # math materialises B*Hq*Lq*Lk scores (several copies, fp32 softmax)
            gb = c["B"] * c["Hq"] * c["Lq"] * c["Lk"] * 4 * 3 / 2**30
            if gb > MATH_LIMIT_GIB:
                skip = f"skipped: math would materialise ~{gb:.0f} GiB of scores"

        def fn(name=name):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=t_mask, is_causal=t_causal, enable_gqa=gqa)

        out[name] = ((lambda name=name: sdpa_kernel([enum[name]])), fn, skip)

    sys.path.insert(0, ROOT)
    try:
        import autosdpa_kernels as ak
    except ImportError:
        import importlib.util
        spec = importlib.util.spec_from_file_location(
            "autosdpa_kernels", os.path.join(ROOT, "kernels", "autosdpa_kernels", "__init__.py"),
            submodule_search_locations=[os.path.join(ROOT, "kernels", "autosdpa_kernels")])
        ak = importlib.util.module_from_spec(spec)
        sys.modules["autosdpa_kernels"] = ak
        spec.loader.exec_module(ak)
    for name, mod in (("triton_flash", ak.flash), ("triton_decode", ak.decode)):
        reasons = mod.not_supported_reasons(q, k, v, mask, 0.0, c["causal"], gqa, q.requires_grad)
        skip = ("ineligible: " + "; ".join(reasons)) if reasons else None

        def fn(mod=mod):
            return mod.attention(q, k, v, attn_mask=mask, causal=c["causal"], enable_gqa=gqa)

        out[name] = (contextlib.nullcontext, fn, skip)
    return out


def _err_text(exc, caught) -> str:
    msgs = [re.sub(r"\s*\(Triggered internally at .*\)\s*$", "", str(w.message), flags=re.S).strip()
            for w in caught]
    msgs = [m for m in msgs if m and not m.endswith("because:")]
    text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if msgs:
        text += " | " + " | ".join(msgs[:3])
    return text[:500]


def run_case(c, rounds, warmup, flush_buf, with_bwd=False):
    device = "cuda"
    dtype = DTYPES[c["dtype"]]
    q, k, v, mask = make_inputs(c, device, requires_grad=with_bwd)
    spec = slice_spec(c)
    ref = reference_slice(c, q.detach(), k.detach(), v.detach(), mask, spec)
    cands = candidates(c, q, k, v, mask)
    results = {}
    timed = {}
    do = torch.randn(c["B"], c["Hq"], c["Lq"], c["D"], device=device, dtype=dtype) if with_bwd else None
    for name, (ctx, fn, skip) in cands.items():
        if with_bwd and name == "triton_decode":
            skip = skip or "forward-only"
        if skip:
            results[name] = dict(status="skipped", reason=skip)
            continue
        if with_bwd:
            def call(fn=fn):
                o = fn()
                o.backward(do)
                return o
        else:
            call = fn
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with ctx():
                    out = call()
                    torch.cuda.synchronize()
            ok, err = check(out.detach(), ref, spec, dtype)
            del out
            if not ok:
                results[name] = dict(status="mismatch", reason=f"max abs err {err:.3e} vs reference", err=err)
                continue
            with ctx():
                for _ in range(warmup):
                    call()
            torch.cuda.synchronize()
            results[name] = dict(status="ok", err=err)
            timed[name] = (ctx, call)
        except torch.cuda.OutOfMemoryError as exc:
            results[name] = dict(status="error", reason=f"out of memory: {str(exc).splitlines()[0][:200]}")
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 - record every failure, keep going
            results[name] = dict(status="error", reason=_err_text(exc, caught))
            torch.cuda.empty_cache()
    samples = {n: [] for n in timed}
    names = list(timed)
    for r in range(rounds):
        order = names[r % max(1, len(names)):] + names[:r % max(1, len(names))]
        for name in order:
            ctx, call = timed[name]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with ctx():
                flush_buf.zero_()
                start.record()
                call()
                end.record()
            torch.cuda.synchronize()
            samples[name].append(start.elapsed_time(end) / 1e3)
    fl = flops(c, with_bwd)
    for name, s in samples.items():
        med = statistics.median(s)
        qs = statistics.quantiles(s, n=4) if len(s) >= 4 else [min(s), med, max(s)]
        results[name].update(median_s=med, iqr_s=qs[2] - qs[0], samples=len(s), tflops=fl / med / 1e12,
                             gbps=min_bytes(c) / med / 1e9)
    if with_bwd:
        for t in (q, k, v):
            t.grad = None
    del q, k, v, mask
    torch.cuda.empty_cache()
    return results


# ------------------------------------------------------------------------------------------------
# targets, output
# ------------------------------------------------------------------------------------------------
def best_torch(res):
    ok = [(r["median_s"], n) for n, r in res.items() if n in TORCH_BACKENDS and "median_s" in r]
    return min(ok) if ok else (None, None)


#: Device-to-device copy bandwidth measured on this workplace's machines (the device tool's KINDS.md).
HBM_BYTES_PER_S = {"H100": 3.0e12, "H200": 4.3e12}


def hbm_peak(gpu_name: str) -> float | None:
    return next((v for k, v in HBM_BYTES_PER_S.items() if k in (gpu_name or "")), None)


def kv_bytes(c) -> float:
    """Bytes of K and V every decode kernel must read once."""
    return DTYPES[c["dtype"]].itemsize * 2 * c["B"] * c["Hkv"] * c["Lk"] * c["D"]


def _perf(r) -> str:
    return f"{r['tflops']:.0f} TFLOP/s, {r['gbps']:.0f} GB/s" if "median_s" in r else r.get("status", "n/a")


def _check(row, ours, rules, peak=None) -> dict:
    """rules: (label, reference backend or "best" or "hbm", required ratio or None); ratio = ref time / ours."""
    res = row["results"]
    mine = res.get(ours, {})
    checks, perf = [], {ours: _perf(mine)}
    for label, ref, need in rules:
        ratio, vs = None, ref
        if ref == "hbm" and "median_s" in mine and peak:
            ratio = kv_bytes(row["case"]) / mine["median_s"] / peak
            vs = f"{peak / 1e12:.1f} TB/s"
        elif ref != "hbm":
            t, vs = best_torch(res) if ref == "best" else (res.get(ref, {}).get("median_s"), ref)
            if t is not None and "median_s" in mine:
                ratio = t / mine["median_s"]
            if vs in res:
                perf[vs] = _perf(res[vs])
        checks.append(dict(what=label, vs=vs, ratio=ratio, need=need,
                           ok=need is None or (ratio is not None and ratio >= need)))
    if "median_s" in mine and row["case"]["group"] == "decode":
        perf[ours] += f", K+V {kv_bytes(row['case']) / mine['median_s'] / 1e9:.0f} GB/s"
    return dict(case=row["name"], checks=checks, perf=perf, ok=all(c["ok"] for c in checks))


def targets(rows, gpu_name: str = "") -> list[dict]:
    specs = [
        ("triton_flash fwd >= 1.1x PyTorch flash and >= 0.8x best PyTorch (bf16, D=128, causal, L=2k/8k)",
         "triton_flash", [("vs flash", "flash", 1.1), ("vs best", "best", 0.8)],
         lambda c: c["group"] == "prefill" and c["dtype"] == "bf16" and c["D"] == 128
         and c["causal"] == "top_left" and c["Lq"] in (2048, 8192)),
        ("triton_flash >= 2x best PyTorch (masked GQA, bool padding mask, Hq=32, Hkv=8, L=2k)", "triton_flash",
         [("vs best", "best", 2.0)], lambda c: c["group"] == "masked_gqa" and c["Lq"] == 2048),
        ("triton_decode >= 80% of HBM bandwidth, K+V bytes (Lq=1, Lk>=8k, B<=8, Hq=32, Hkv=8)", "triton_decode",
         [("of HBM", "hbm", 0.8), ("vs best", "best", None)],
         lambda c: c["group"] == "decode" and c["Lq"] == 1 and c["Lk"] >= 8192 and c["B"] <= 8
         and c["Hq"] == 32 and c["Hkv"] == 8),
    ]
    peak = hbm_peak(gpu_name)
    out = []
    for title, ours, rules, sel in specs:
        cases = [_check(row, ours, rules, peak) for row in rows if row["mode"] == "fwd" and sel(row["case"])]
        out.append(dict(target=title, backend=ours, cases=cases, met=bool(cases) and all(x["ok"] for x in cases)))
    return out


def _check_text(c) -> str:
    got = "n/a" if c["ratio"] is None else f"{c['ratio']:.2f}x"
    need = "" if c["need"] is None else f" (need {c['need']:.2f}x{'' if c['ok'] else ', MISSED'})"
    return f"{got} {c['what']} {c['vs']}{need}"


def target_lines(tg) -> list[str]:
    """Each target, then each case: its ratios (missed ones marked) and the TFLOP/s and GB/s behind them."""
    lines = []
    for t in tg:
        lines.append(f"- {'MET' if t['met'] else 'MISSED'}: {t['target']}")
        for x in t["cases"]:
            perf = "; ".join(f"{k} {v}" for k, v in x["perf"].items())
            lines.append(f"  - {'ok' if x['ok'] else 'MISSED'} {x['case']}: "
                         + "; ".join(_check_text(c) for c in x["checks"]) + f" [{perf}]")
    return lines


def fmt_cell(r, group=""):
    if "median_s" in r:
        if group == "decode":
            return f"{r['median_s'] * 1e3:.3f} ms / {r['gbps']:.0f} GB/s"
        return f"{r['median_s'] * 1e3:.3f} ms / {r['tflops']:.0f} TF"
    if r.get("status") == "skipped":
        return "—"
    return r.get("status", "?")


def write_outputs(out_dir, meta, rows, tg):
    os.makedirs(out_dir, exist_ok=True)
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", meta["gpu"]).strip("-").lower()
    tma = "" if meta.get("kernel_tma", "1") != "0" else "-no-tma"   # an A/B run keeps its own files
    stem = os.path.join(out_dir, f"kernels-{gpu}-{meta['date'][:10]}{tma}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, results=rows, targets=tg), f, indent=1)
    names = list(TORCH_BACKENDS) + list(OURS)
    lines = [f"# Triton kernels vs PyTorch SDPA backends — {meta['gpu']}", "",
             f"{meta['date']} · torch {meta['torch']} · triton {meta['triton']} · CUDA {meta['cuda']} · "
             f"cuDNN {meta['cudnn']} · host {meta['machine']} · kernel configs {meta['kernel_configs']} · "
             f"TMA {'off (AUTOSDPA_KERNEL_TMA=0)' if meta.get('kernel_tma') == '0' else 'on where eligible'}", "",
             "Median of CUDA-event timings (L2 flushed, candidates interleaved); TF = TFLOPS "
             "(dense FLOPs, causal counts visible pairs only); decode rows show GB/s of q+k+v+out moved once. "
             "— = not eligible / skipped.", "",
             "| case | mode | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for row in rows:
        cells = [fmt_cell(row["results"].get(n, {"status": "skipped"}), row["case"]["group"]) for n in names]
        lines.append(f"| {row['name']} | {row['mode']} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets (issue 8)", ""] + target_lines(tg)
    lines += ["", "## Errors / skips", ""]
    for row in rows:
        for n, r in row["results"].items():
            if r.get("status") in ("error", "mismatch", "skipped") and r.get("reason"):
                lines.append(f"- {row['name']} [{row['mode']}] {n}: {r['status']}: {r['reason']}")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return stem


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks"), help="output directory")
    ap.add_argument("--quick", action="store_true", help="short sweep")
    ap.add_argument("--targets", action="store_true", help="only the problems issue 8's targets name")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 25, quick 10)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--bwd", action="store_true", help="also time forward+backward on the prefill cases")
    ap.add_argument("--filter", default=None, help="regex on case names")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device available; this benchmark needs a GPU "
              "(the kernels' CPU interpreter mode is for tests only).", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("bench_kernels: triton is not installed (pip install 'autosdpa[triton]').", file=sys.stderr)
        return 2

    rounds = args.rounds or (10 if args.quick or args.targets else 25)
    if args.targets:
        global MATH_LIMIT_GIB
        MATH_LIMIT_GIB = 0.5   # never the best on these problems, and slow: leave time for the rest
    props = torch.cuda.get_device_properties(0)
    meta = dict(machine=platform.node(), platform=platform.platform(), gpu=torch.cuda.get_device_name(0),
                capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                sm_count=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                hbm_peak_bytes_per_s=hbm_peak(torch.cuda.get_device_name(0)),
                kernel_configs=os.environ.get("AUTOSDPA_KERNEL_CONFIGS", "all"),
                # "0": the pointer (cp.async) path everywhere, for an A/B against the TMA descriptors
                kernel_tma=os.environ.get("AUTOSDPA_KERNEL_TMA", "1"),
                argv=sys.argv[1:] if argv is None else list(argv), rounds=rounds, warmup=args.warmup)
    flush_buf = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    cases = build_cases(args.quick, args.targets)
    if args.filter:
        cases = [c for c in cases if re.search(args.filter, case_name(c))]
    rows = []
    for c in cases:
        modes = ["fwd"] + (["fwdbwd"] if args.bwd and c["group"] in ("prefill", "masked_gqa") else [])
        for mode in modes:
            name = case_name(c)
            print(f"== {name} [{mode}]", flush=True)
            res = run_case(c, rounds, args.warmup, flush_buf, with_bwd=(mode == "fwdbwd"))
            rows.append(dict(name=name, mode=mode, case=c, results=res))
            for n, r in res.items():
                if "median_s" in r:
                    print(f"   {n:14s} {r['median_s'] * 1e3:9.3f} ms  {r['tflops']:7.1f} TFLOPS  "
                          f"{r['gbps']:7.0f} GB/s  "
                          f"(iqr {r['iqr_s'] * 1e3:.3f} ms, err {r['err']:.1e})")
                else:
                    print(f"   {n:14s} {r['status']}: {r.get('reason', '')[:160]}")
    tg = targets(rows, meta["gpu"])
    stem = write_outputs(args.out, meta, rows, tg)
    print("\nTargets:")
    print("\n".join(target_lines(tg)))
    print(f"\nwrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
