"""The main job of the quickstart: run a few typical attention calls through autosdpa on this machine's
default SQLite cache, twice, and show what was chosen and why.

    python scripts/demo.py [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch's, when numpy is absent
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import autosdpa  # noqa: E402
from autosdpa import dispatch  # noqa: E402


def workloads(device, dtype):
    """(name, q, k, v, kwargs) for a small decoder: prefill, decode with a KV cache, padded batch, encoder."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    B, Hq, Hkv, D = 2, 8, 2, 64
    pad = torch.ones(B, 1, 1, 256, dtype=torch.bool, device=device)
    pad[1, ..., 200:] = False  # second sequence is shorter
    return [
        ("prefill causal GQA L=256", r(B, Hq, 256, D), r(B, Hkv, 256, D), r(B, Hkv, 256, D),
         dict(is_causal=True, enable_gqa=True)),
        ("decode Lq=1 Lk=1000 GQA", r(B, Hq, 1, D), r(B, Hkv, 1000, D), r(B, Hkv, 1000, D), dict(enable_gqa=True)),
        ("padded batch mask L=256", r(B, Hq, 256, D), r(B, Hq, 256, D), r(B, Hq, 256, D), dict(attn_mask=pad)),
        ("encoder L=197 D=64", r(B, 12, 197, D), r(B, 12, 197, D), r(B, 12, 197, D), {}),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    console = Console()
    console.print(f"autosdpa {autosdpa.__version__} on {a.device}; cache: {dispatch.get_store().display_url}")
    console.print(f"backends available here: {', '.join(autosdpa.available_backends(a.device))}")
    table = Table(title="what autosdpa chose")
    for col in ("call", "1st call", "2nd call", "chosen", "PyTorch's pick", "median µs per backend"):
        table.add_column(col)
    reasons = []
    for name, q, k, v, kw in workloads(a.device, dtype):
        t0 = time.perf_counter()
        autosdpa.sdpa(q, k, v, **kw)  # first sight: tunes (or finds it in the cache from an earlier run)
        t1 = time.perf_counter()
        autosdpa.sdpa(q, k, v, **kw)  # a dict lookup, then the winner
        t2 = time.perf_counter()
        d = autosdpa.explain(q, k, v, **kw)
        timings = ", ".join(f"{b} {t * 1e6:.0f}" for b, t in d.timings.items() if t is not None)
        table.add_row(name, f"{(t1 - t0) * 1e3:.1f} ms", f"{(t2 - t1) * 1e3:.2f} ms", d.backend,
                      d.pytorch_choice or "-", timings)
        reasons.append(f"[bold]{name}[/bold]: {d.backend} — {d.reason}")
    console.print(table)
    for line in reasons:
        console.print(line)
    console.print("Run it again: the first calls become cache hits (no timing). See `autosdpa doctor`.")


if __name__ == "__main__":
    main()
