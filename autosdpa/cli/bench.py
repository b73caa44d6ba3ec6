"""``autosdpa bench``: autosdpa vs PyTorch's default vs the best single backend, timed side by side."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._group import main
from ._common import (err, fmt_s, fmt_x, gather, out, print_json, resolve_device, short_key, shorten, tune_config,
                      use_db, workload_options, deterministic)


def _geomean(xs):
    xs = [x for x in xs if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def pick_single_backend(tuned: list[dict]) -> str | None:
    """The one backend you would hard-code for this sweep: among those that ran (and passed) on the most
    problems, the lowest geometric-mean time over them. Where it cannot run, the bench uses PyTorch's default."""
    names = {b for r in tuned for b, t in r["timings"].items() if t}
    if not names:
        return None
    cover = {b: sum(1 for r in tuned if r["timings"].get(b)) for b in names}
    most = max(cover.values())
    # geometric mean of the time relative to each problem's fastest, so big problems do not dominate
    score = {}
    for b in (b for b in names if cover[b] == most):
        rel = [r["timings"][b] / min(t for t in r["timings"].values() if t) for r in tuned if r["timings"].get(b)]
        score[b] = _geomean(rel)
    return min(score, key=lambda b: (score[b], b))


def _make_fn(fn, call, train: bool):
    """A no-arg function running ``fn`` on ``call`` (forward, or forward + backward when ``train``)."""
    import torch

    args = (call.attn_mask, call.dropout_p, call.is_causal)
    if not train:
        q, k, v = (t.detach() for t in (call.query, call.key, call.value))

        def run():
            with torch.no_grad():
                return fn(q, k, v, *args, scale=call.scale, enable_gqa=call.enable_gqa)
        return run
    xs = tuple(t.detach().clone().requires_grad_() for t in (call.query, call.key, call.value))
    with torch.no_grad():
        g = torch.randn_like(fn(*(x.detach() for x in xs), *args, scale=call.scale, enable_gqa=call.enable_gqa))

    def run_train():
        o = fn(*xs, *args, scale=call.scale, enable_gqa=call.enable_gqa)
        return torch.autograd.grad(o, xs, g)
    return run_train


def _versions(device) -> dict:
    import importlib.metadata as md
    import sys

    import torch

    v = {"python": sys.version.split()[0], "torch": torch.__version__, "autosdpa": md.version("autosdpa")}
    for pkg in ("triton", "click", "rich", "sqlalchemy"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    if device.type == "cuda":
        v["cuda"] = torch.version.cuda
        v["cudnn"] = torch.backends.cudnn.version()
    return v


def write_plot(path: Path, results: list[dict], single: str | None, title: str) -> str | None:
    """Bar chart of speedup over PyTorch's default; returns a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipping the plot (pip install 'autosdpa[plot]')"
    labels = [shorten(r["label"] or short_key(r["problem"]), 40) for r in results]
    a = [r["autosdpa_speedup"] or 0 for r in results]
    s = [r["single_speedup"] or 0 for r in results]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(results) + 3), 4.5))
    xs = range(len(results))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], a, w, label="autosdpa")
    ax.bar([x + w / 2 for x in xs], s, w, label=f"best single backend ({single})")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="PyTorch default")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("speedup over PyTorch default (higher is better)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _markdown(doc: dict) -> str:
    lines = [f"# autosdpa bench: {doc['device_name']} ({doc['device']})", "",
             f"{doc['date']}, torch {doc['versions']['torch']}, autosdpa {doc['versions']['autosdpa']}; "
             f"medians of interleaved rounds ({doc['seconds_per_problem']} s per problem).", "",
             f"Best single backend for this sweep: **{doc['single_backend']}**.", "",
             "| problem | PyTorch default | autosdpa | speedup | best single | speedup |",
             "|---|---|---|---|---|---|"]
    for r in doc["results"]:
        lines.append(f"| {r['label'] or short_key(r['problem'])} | {r['pytorch_choice']} {fmt_s(r['pytorch_s'])} | "
                     f"{r['autosdpa_backend']} {fmt_s(r['autosdpa_s'])} | {fmt_x(r['autosdpa_speedup'])} | "
                     f"{r['single_backend']} {fmt_s(r['single_s'])} | {fmt_x(r['single_speedup'])} |")
    s = doc["summary"]
    lines.append(f"| **geometric mean** | | | **{fmt_x(s['autosdpa_speedup_geomean'])}** | | "
                 f"**{fmt_x(s['single_speedup_geomean'])}** |")
    return "\n".join(lines) + "\n"


@main.command()
@workload_options
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu).")
@click.option("--db", default=None, metavar="PATH|URL", help="Database for the tuning step (default: $AUTOSDPA_DB).")
@click.option("--budget", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Tuning budget per problem not yet tuned.")
@click.option("--seconds", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Timing time per problem for the side-by-side comparison.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="autosdpa-bench", show_default=True,
              help="Directory for bench.json, bench.md and bench.png.")
@click.option("--no-plot", is_flag=True, help="Do not draw bench.png.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON document on stdout instead of the table.")
@click.option("--sweep", "sweep", is_flag=True,
              help="Run the built-in sweep (LLM prefill/decode, encoders, diffusion, training) instead of a "
                   "workload: default vs every backend alone vs autosdpa, on a fresh database; writes "
                   "OUT/sweep_<device>.{json,md,png}. Same as scripts/bench_sweep.py.")
@click.option("--quick", is_flag=True, help="With --sweep: a subset of the problems, shorter timing.")
@click.option("--dry", is_flag=True, help="With --sweep: tiny sizes and few rounds (checks that it runs).")
def bench(workload, device, db, budget, seconds, out_dir, no_plot, as_json, sweep, quick, dry) -> None:
    """Benchmark a sweep: autosdpa vs PyTorch's default vs the best single backend, in one run.

    Each problem is tuned first if needed; then the three are timed side by side (interleaved rounds,
    medians). Writes a table, OUT/bench.json (machine, versions, date), OUT/bench.md and OUT/bench.png
    (needs matplotlib).

    \b
    Examples:
      autosdpa bench --preset llama3-8b --out benchmarks/h100-llama3
      autosdpa bench --shape hq=8,lq=1024,d=64 --shape hq=8,lq=4096,d=64,causal --device cpu
      autosdpa bench --sweep --device cuda --quick --out benchmarks   # the built-in sweep
    """
    import torch

    from .. import api
    from ..environment import environment

    dev = resolve_device(device)
    _writable_dir(out_dir)  # before any timing: a bad --out must not cost the whole run
    if sweep:
        if any(workload[k] for k in ("shapes", "files", "presets", "recordings")):
            raise click.UsageError("--sweep runs its own problem table: drop --shape/--file/--preset/--from")
        src = click.get_current_context().get_parameter_source("seconds")
        run_sweep_command(dev, db=db, budget=budget, seconds=None if src.name == "DEFAULT" else seconds,
                          out_dir=out_dir, no_plot=no_plot, as_json=as_json, quick=quick, dry=dry)
        return
    if quick or dry:
        raise click.UsageError("--quick and --dry go with --sweep")
    items = gather(workload, dev)
    use_db(db)
    config = tune_config(budget)
    _fp, info = environment(dev)
    tuned: list[dict] = []
    results: list[dict] = []
    columns = (TextColumn("[bold]{task.fields[phase]}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=err) as progress:
        task = progress.add_task("", total=len(items), phase="tuning")
        for it in items:
            progress.update(task, description=shorten(it.label or short_key(it.problem.key), 60))
            d = api.tune([it.problem], progress=False, device=dev, config=config)[0]
            tuned.append({"item": it, "decision": d, "timings": {b: t for b, t in d.timings.items() if t}})
            progress.advance(task)
        single = pick_single_backend(tuned)
        progress.reset(task, total=len(items), phase="timing")
        for r in tuned:
            progress.update(task, description=shorten(r["item"].label or short_key(r["item"].problem.key), 60))
            results.append(_time_one(r, single, dev, seconds))
            progress.advance(task)
    summary = {"autosdpa_speedup_geomean": _geomean([r["autosdpa_speedup"] for r in results]),
               "single_speedup_geomean": _geomean([r["single_speedup"] for r in results]),
               "autosdpa_vs_single_geomean": _geomean([r["single_s"] / r["autosdpa_s"] for r in results]),
               "problems": len(results)}
    doc = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "device": str(dev),
           "device_name": info["device_name"],
           "machine": {"hostname": platform.node(), "platform": platform.platform(), "cpu": platform.processor()
                       or platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                       **info},
           "versions": _versions(dev), "seconds_per_problem": seconds, "single_backend": single,
           "summary": summary, "results": results}
    outp = Path(out_dir)
    try:
        outp.mkdir(parents=True, exist_ok=True)
        (outp / "bench.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        (outp / "bench.md").write_text(_markdown(doc))
    except OSError as e:
        raise click.ClickException(f"cannot write results to {outp}: {e}") from None
    note = "plot skipped (--no-plot)" if no_plot else write_plot(
        outp / "bench.png", results, single, f"autosdpa bench on {info['device_name']} ({dev})")
    if as_json:
        print_json(doc)
    else:
        _print_table(results, summary, single, f"{info['device_name']} ({dev})")
    err.print(f"wrote {outp / 'bench.json'}, {outp / 'bench.md'}"
              + ("" if note else f", {outp / 'bench.png'}"))
    if note:
        err.print(note, style="yellow", markup=False)


def _writable_dir(out_dir: str) -> None:
    """Create ``out_dir`` and check it takes files, or fail now with ``Error:`` (exit 1)."""
    outp = Path(out_dir)
    try:
        outp.mkdir(parents=True, exist_ok=True)
        probe = outp / ".autosdpa-write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise click.ClickException(f"cannot write results to {outp}: {e}") from None


def run_sweep_command(dev, *, db, budget, seconds, out_dir, no_plot, as_json, quick, dry) -> None:
    """``autosdpa bench --sweep``: ``autosdpa.sweep.run_sweep`` with a progress bar, a table and the targets."""
    from .. import sweep as S
    from .. import sweep_report

    if db and os.path.exists(db):
        raise click.BadParameter(f"{db} exists: the sweep measures first-sight tuning on a new database",
                                 param_hint="--db")
    n = len(S.problem_table(dev, quick=quick))
    columns = (TextColumn("[bold]sweep[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=err) as progress:
        task = progress.add_task("", total=n + 1)

        def step(i, _n, name):
            progress.update(task, completed=i, description=shorten(name, 60))
        doc = S.run_sweep(dev, quick=quick, dry=dry, seconds=seconds, budget_s=budget, db=db, progress=step)
        progress.update(task, completed=n + 1)
    try:
        paths, note = sweep_report.write_outputs(doc, out_dir, f"sweep_{dev.type}", plot=not no_plot)
    except OSError as e:
        raise click.ClickException(f"cannot write results to {out_dir}: {e}") from None
    if as_json:
        print_json(doc)
    else:
        t = Table(title=f"autosdpa sweep on {doc['machine']['device_name']} ({dev}); time ratios, below 1 is faster")
        for col in ("problem", "default", "autosdpa", "autosdpa/default", "autosdpa/oracle", "first sight"):
            t.add_column(col, justify="left" if col == "problem" else "right", overflow="fold")
        for r in doc["results"]:
            reg = " [red]regression[/]" if r["regression"] else ""
            orc = r["autosdpa_vs_oracle"]
            t.add_row(r["name"], f"{r['pytorch_choice']} {fmt_s(r['timings_s']['default']['median'])}",
                      f"{r['autosdpa_backend']} {fmt_s(r['timings_s']['autosdpa']['median'])}",
                      f"{r['autosdpa_vs_default']['median']:.3f}{reg}",
                      f"{orc['median']:.3f} ({r['oracle']})" if orc else "-", fmt_s(r["first_sight_s"]))
        s = doc["summary"]
        t.add_section()
        t.add_row("[bold]geometric mean[/]", "", "", f"[bold]{s['autosdpa_vs_default_geomean']:.3f}[/]",
                  f"{s['autosdpa_vs_oracle_geomean'] or 0:.3f}", "")
        out.print(t)
        for line in sweep_report.target_lines(doc):
            out.print(line, markup=False, highlight=False)
    err.print("wrote " + ", ".join(map(str, paths)))
    if note:
        err.print(note, style="yellow", markup=False)


def _time_one(r: dict, single: str | None, dev, seconds: float) -> dict:
    """One tuned problem timed side by side: PyTorch's default, autosdpa, the sweep's single backend."""
    import torch
    import torch.nn.functional as F

    import autosdpa

    from ..sweep import backend_fn
    from ..forms import synthetic_call
    from ..timing import summarize, time_interleaved

    it, d = r["item"], r["decision"]
    with deterministic(it.problem.deterministic):
        call = synthetic_call(it.problem, dev)
        single_here = single if single in r["timings"] else None
        fns = {"pytorch": _make_fn(F.scaled_dot_product_attention, call, it.problem.train),
               "autosdpa": _make_fn(autosdpa.scaled_dot_product_attention, call, it.problem.train)}
        if single_here:
            fns["single"] = _make_fn(backend_fn(single_here), call, it.problem.train)
        samples = time_interleaved(fns, dev, budget_s=seconds, min_rounds=5, max_rounds=1000)
    med = {k: summarize(v)[0] for k, v in samples.items()}
    spread = {k: summarize(v)[1] for k, v in samples.items()}
    single_s = med.get("single", med["pytorch"])
    del call, fns
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "problem": d.problem or it.problem.key, "label": it.label, "train": it.problem.train,
        "pytorch_choice": d.pytorch_choice, "pytorch_s": med["pytorch"], "pytorch_spread_s": spread["pytorch"],
        "autosdpa_backend": d.backend, "autosdpa_s": med["autosdpa"], "autosdpa_spread_s": spread["autosdpa"],
        "autosdpa_speedup": med["pytorch"] / med["autosdpa"],
        "single_backend": single_here or f"{d.pytorch_choice} (fallback: {single} cannot run this)",
        "single_s": single_s, "single_spread_s": spread.get("single", spread["pytorch"]),
        "single_speedup": med["pytorch"] / single_s,
        "rounds": len(samples["pytorch"]), "tflops_autosdpa": it.problem.flops / med["autosdpa"] / 1e12,
    }


def _print_table(results: list[dict], summary: dict, single: str | None, where: str) -> None:
    t = Table(title=f"autosdpa bench on {where}; best single backend: {single}")
    t.add_column("problem", overflow="fold", max_width=50)
    t.add_column("PyTorch default", justify="right")
    t.add_column("autosdpa", justify="right")
    t.add_column("speedup", justify="right")
    t.add_column("best single", justify="right")
    t.add_column("speedup", justify="right")
    for r in results:
        t.add_row(r["label"] or short_key(r["problem"]), f"{r['pytorch_choice']} {fmt_s(r['pytorch_s'])}",
                  f"{r['autosdpa_backend']} {fmt_s(r['autosdpa_s'])}", fmt_x(r["autosdpa_speedup"]),
                  f"{shorten(r['single_backend'], 24)} {fmt_s(r['single_s'])}", fmt_x(r["single_speedup"]))
    t.add_section()
    t.add_row("[bold]geometric mean[/]", "", "", f"[bold]{fmt_x(summary['autosdpa_speedup_geomean'])}[/]", "",
              f"[bold]{fmt_x(summary['single_speedup_geomean'])}[/]")
    out.print(t)
