"""``autosdpa explain``: every backend for one problem, eligible or why not, times, the choice and why."""
from __future__ import annotations

import math

import click
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ._group import main
from ._common import (budget_option, current_store, db_option, device_option, err, fmt_s, fmt_x, json_option, out,
                      print_json, print_note, print_table, resolve_device, shape_option, short_key, tune_config,
                      use_db, deterministic)


def fmt_median(median_s: float | None, spread_s: float | None, samples: int) -> str:
    """``1.234 ms ± 0.050 ms``; one sample has no spread to show (a ``± 0.0 µs`` would claim no noise)."""
    if median_s is None:
        return "-"
    if samples <= 1 or spread_s is None:
        return f"{fmt_s(median_s)} (1 sample)" if samples == 1 else fmt_s(median_s)
    return f"{fmt_s(median_s)} ± {fmt_s(spread_s)}"


def _backend_states(elig: dict, unavailable: dict, meas: dict, d, no_tune: bool) -> list[dict]:
    """One dict per backend: unavailable / not eligible / not measured / its status, with its numbers."""
    torch_s = d.timings.get(d.pytorch_choice) if d.pytorch_choice else None
    backends = []
    for name, reasons in elig.items():
        m = meas.get(name)
        if name in unavailable:
            state, why = "unavailable", unavailable[name]
        elif reasons:
            state, why = "not eligible", "; ".join(reasons)
        elif m is None:
            state, why = "not measured", "no measurement yet" if no_tune else ""
        elif m.status != "ok":
            state, why = m.status, m.detail
        else:
            state, why = "ok", m.detail
        backends.append({"backend": name, "state": state, "why": why,
                         "median_s": m.median_s if m else None, "spread_s": m.spread_s if m else None,
                         "samples": m.samples if m else 0, "max_error": m.max_error if m else None,
                         "vs_pytorch": (torch_s / m.median_s) if (m and m.ok and torch_s) else None,
                         "chosen": name == d.backend, "pytorch_choice": name == d.pytorch_choice})
    return backends


@main.command()
@shape_option(repeat=False, required=True)
@click.option("--dtype", default=None, metavar="fp16|bf16|fp32|fp64", show_default="the spec's",
              help="Override the spec's dtype.")
@click.option("--train", is_flag=True, help="Forward + backward.")
@device_option()
@db_option("Database to read, and to write when the problem must be tuned")
@click.option("--force", is_flag=True, help="Re-tune even if measurements exist.")
@click.option("--no-tune", is_flag=True, help="Only look up: never time (a miss shows PyTorch's default).")
@budget_option("Timing budget in seconds if the problem must be tuned (checks and warm-up come on top)")
@json_option()
def explain(spec, dtype, train, device, db, force, no_tune, budget, as_json) -> None:
    """Why autosdpa picks what it picks for one problem: each backend, eligible or why not, its measurement,
    the winner and the reason. Tunes the problem first if it has no measurements (unless --no-tune).

    \b
    Examples:
      autosdpa explain --shape b=1,hq=32,hkv=8,lq=1,lk=8192,d=128,dtype=bf16
      autosdpa explain --shape hq=8,lq=4096,lk=77,d=40,fp16 --device cuda:1 --force
    """
    import autosdpa

    from .. import api, workload as W
    from ..eligibility import eligibility
    from ..forms import synthetic_call
    from ..environment import environment
    from ._common import default_dtype_for

    dev = resolve_device(device)
    try:
        p = W.parse_shape(spec, default_dtype=default_dtype_for(dev))
        (item,) = W.apply_overrides([W.WorkItem(p)], dtype=dtype, train=train)
    except W.WorkloadError as e:
        raise click.BadParameter(f"{spec!r}: {e}", param_hint="--shape") from None
    p = item.problem
    use_db(db, create=not no_tune)  # --no-tune only looks up: it creates no database
    with deterministic(p.deterministic):
        if not no_tune:
            api.tune([p], progress=False, device=dev, force=force, config=tune_config(budget))
        call = synthetic_call(p, dev)
        with autosdpa.mode("lookup"):
            d = autosdpa.explain(call.query, call.key, call.value, attn_mask=call.attn_mask,
                                 dropout_p=call.dropout_p, is_causal=call.is_causal, scale=call.scale,
                                 enable_gqa=call.enable_gqa)
        elig = eligibility(call)
    unavailable = api.unavailable_reasons(dev)
    fp, info = environment(dev)
    meas = {}
    if d.problem:  # our kernels' rows live under the kernels' environment, PyTorch's under the torch one
        store = current_store()
        meas = {**store.lookup(environment(dev, kernels=True)[0], d.problem), **store.lookup(fp, d.problem)}
    backends = _backend_states(elig, unavailable, meas, d, no_tune)
    if as_json:
        print_json({"problem": d.problem, "requested": p.key, "device": str(dev), "environment": {"fingerprint": fp, **info},
                    "choice": d.backend, "reason": d.reason, "source": d.source,
                    "pytorch_choice": d.pytorch_choice, "backends": backends})
        return
    t = Table(title=f"{short_key(d.problem or p.key)} on {info['device_name']}")
    t.add_column("backend")
    t.add_column("state")
    t.add_column("median ± spread", justify="right")
    t.add_column("samples", justify="right")
    t.add_column("max error", justify="right")
    t.add_column("vs PyTorch", justify="right")
    t.add_column("why / detail", overflow="fold", max_width=60)
    for b in backends:
        if b["state"] == "unavailable":
            continue
        name = b["backend"] + (" ★" if b["chosen"] else "")
        state = {"ok": "[green]ok[/]", "rejected": "[red]rejected[/]"}.get(b["state"], f"[dim]{b['state']}[/]")
        e = b["max_error"]
        med = fmt_median(b["median_s"], b["spread_s"], b["samples"])
        t.add_row(f"[bold]{name}[/]" if b["chosen"] else name, state, med, str(b["samples"] or "-"),
                  "-" if e is None or not math.isfinite(e) else f"{e:.2g}", fmt_x(b["vs_pytorch"]), Text(b["why"]))
    print_table(t)
    gone = [b for b in backends if b["state"] == "unavailable"]
    if gone:
        print_note("unavailable on this device: " + "; ".join(f"{b['backend']} ({b['why']})" for b in gone))
    out.print(f"choice: [bold]{d.backend}[/] — {escape(d.reason)}  [dim](source: {d.source})[/]",
              soft_wrap=not out.is_terminal)
    out.print(f"PyTorch would run: {d.pytorch_choice or '-'}")
    if d.problem and d.problem != p.key:
        err.print(f"[dim]stored under the bucketed key {d.problem}[/]")
