"""Host time per call of a plan's winner: the checked path (``backend.run``) against the runner a plan sets up
once per layout (``backend.runner(call)``), side by side in one process, interleaved.

On the CPU the Triton kernels run under the interpreter, so their launches are stubbed out: what is timed is
the Python around them (checks, mask strides, config choice, argument building), which on a GPU host is paid
on every call before Triton's own launcher. PyTorch's backends run for real (tiny sizes). On CUDA everything
runs for real; a sample is synchronised once at its end, so small calls measure the host cost.

    python scripts/bench_runners.py [--device cpu|cuda] [--rounds 30] [--out benchmarks]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path



def cases(dev) -> list[tuple[str, list[str], tuple, dict]]:
    import torch

    def t(*shape, dtype=torch.float16):
        return torch.randn(*shape, device=dev, dtype=dtype)
    kernels = ["triton_flash", "triton_decode"]
    torch_names = ["math", "flash"] if dev.type == "cpu" else ["flash", "efficient", "cudnn", "math"]
    out = [("decode fp16 B=1 Hq=32 Hkv=8 Lk=1024 D=128", kernels + ([] if dev.type == "cpu" else torch_names),
            (t(1, 32, 1, 128), t(1, 8, 1024, 128), t(1, 8, 1024, 128)), {"enable_gqa": True}),
           ("prefill fp16 B=1 H=32 L=512 D=128 causal", ["triton_flash"] + ([] if dev.type == "cpu" else torch_names),
            (t(1, 32, 512, 128),) * 3, {"is_causal": True})]
    if dev.type == "cpu":
        x = t(1, 1, 8, 8, dtype=torch.float32)
        out.append(("tiny fp32 B=1 H=1 L=8 D=8", torch_names, (x, x, x), {}))
    return out


def stub_kernel_launches() -> None:
    """Keep all the set-up work of a launch (config choice, grid), drop the launch itself."""
    from autosdpa.backends.triton import _load_kernels
    launch = _load_kernels().launch
    real = launch._launcher

    def launcher(lch, kmod):
        real(lch, kmod)
        return lambda *args: None
    launch._launcher = launcher


def per_call(fn, n: int, sync) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=200, help="calls per timed sample")
    ap.add_argument("--out", default="benchmarks")
    a = ap.parse_args()
    if a.device == "cpu":  # the interpreter is chosen when triton is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("AUTOSDPA_TRITON_INTERPRET", "1")
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import torch

    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    from autosdpa.backends import Call, get
    from autosdpa.environment import cpu_name

    if dev.type == "cpu":
        torch.set_num_threads(1)
        stub_kernel_launches()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    with torch.no_grad():
        for label, names, (q, k, v), kw in cases(dev):
            for name in names:
                backend = get(name)
                call = Call(q, k, v, **kw)
                why = backend.not_supported_reasons(call)
                if why:
                    print(f"{label:45s} {name:14s} not eligible: {why[0]}")
                    continue
                runner = backend.runner(call)
                args = call.args()
                fns = {"run": lambda: backend.run(*args), "runner": lambda: runner(*args)}
                for fn in fns.values():  # warm-up: compiles, autotunes, fills caches
                    per_call(fn, 3, sync)
                samples = {w: [] for w in fns}
                for r in range(a.rounds):
                    for w in (("run", "runner") if r % 2 == 0 else ("runner", "run")):
                        samples[w].append(per_call(fns[w], a.calls, sync))
                row = {"case": label, "backend": name, "set_up_once": runner != backend.run,
                       **{f"{w}_us": statistics.median(s) for w, s in samples.items()},
                       **{f"{w}_min_us": min(s) for w, s in samples.items()}}
                row["saved_us"] = row["run_us"] - row["runner_us"]
                rows.append(row)
                print(f"{label:45s} {name:14s} run {row['run_us']:8.1f} us  runner {row['runner_us']:8.1f} us  "
                      f"saved {row['saved_us']:6.1f} us")
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {cpu_name()}",
            "triton_launches": "stubbed (interpreter): Python set-up only" if dev.type == "cpu" else "real",
            "method": f"median per-call µs of {a.rounds} interleaved samples of {a.calls} calls, no_grad"}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"runners_{dev.type}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    lines = [f"# A plan's winner per call: checked path vs runner ({dev.type})", "",
             f"{meta['date']}, {meta['device_name']}, torch {meta['torch']}, triton {meta['triton']}, python "
             f"{meta['python']}. Triton launches: {meta['triton_launches']}. {meta['method']}.", "",
             "| case | backend | checked path µs | runner µs | saved µs |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['backend']} | {r['run_us']:.1f} | {r['runner_us']:.1f} | {r['saved_us']:.1f} |"
              for r in rows]
    (out / f"runners_{dev.type}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
