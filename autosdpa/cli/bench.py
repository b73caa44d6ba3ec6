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
from ._common import (budget_option, db_option, device_option, err, fmt_s, fmt_x, gather, json_option, out, print_json,
                      print_table, resolve_device, short_key, shorten, tune_config, use_db, workload_options,
                      deterministic)


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
    """Speedup over PyTorch's default per problem, autosdpa and the best single backend, each with its spread
    (``sweep_report.speedup_plot``); returns a note when matplotlib is missing."""
    from ..sweep_report import speedup_plot

    def series(label: str, which: str) -> dict:
        return {"label": label, "median": [r[f"{which}_speedup"] for r in results],
                "lo": [r.get(f"{which}_speedup_p25") for r in results],
                "hi": [r.get(f"{which}_speedup_p75") for r in results]}
    names = [r["label"] or short_key(r["problem"]) for r in results]
    return speedup_plot(path, names, [series("autosdpa", "autosdpa"),
                                      series(f"best single backend: {single}\n(PyTorch's default where it "
                                             "cannot run)", "single")], title)


def _noted(x: float | None, within: bool) -> str:
    return fmt_x(x) + (" (within noise)" if within else "")


def _markdown(doc: dict) -> str:
    lines = [f"# autosdpa bench: {doc['device_name']} ({doc['device']})", "",
             f"{doc['date']}, torch {doc['versions']['torch']}, autosdpa {doc['versions']['autosdpa']}; "
             f"medians of interleaved rounds ({doc['seconds_per_problem']} s per problem).", "",
             f"Best single backend for this sweep: **{doc['single_backend']}**. A speedup marked *within noise* "
             "has a per-round ratio whose p25–p75 range includes 1: no difference beyond the noise.", "",
             "| problem | PyTorch default | autosdpa | speedup | best single | speedup |",
             "|---|---|---|---|---|---|"]
    for r in doc["results"]:
        lines.append(f"| {r['label'] or short_key(r['problem'])} | {r['pytorch_choice']} {fmt_s(r['pytorch_s'])} | "
                     f"{r['autosdpa_backend']} {fmt_s(r['autosdpa_s'])} | "
                     f"{_noted(r['autosdpa_speedup'], r.get('autosdpa_within_noise', False))} | "
                     f"{r['single_backend']} {fmt_s(r['single_s'])} | "
                     f"{_noted(r['single_speedup'], r.get('single_within_noise', False))} |")
    s = doc["summary"]
    lines.append(f"| **geometric mean** | | | **{fmt_x(s['autosdpa_speedup_geomean'])}** | | "
                 f"**{fmt_x(s['single_speedup_geomean'])}** |")
    return "\n".join(lines) + "\n"


@main.command()
@workload_options
@device_option()
@db_option("Database for the tuning step")
@budget_option("Tuning budget in seconds per problem not yet tuned (checks and warm-up come on top)")
@click.option("--seconds", type=click.FloatRange(min=0), default=1.0, metavar="SECONDS",
              help="Timing time per problem for the side-by-side comparison.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="autosdpa-bench",
              help="Directory for bench.json, bench.md and bench.png.")
@click.option("--no-plot", is_flag=True, help="Do not draw bench.png.")
@json_option("Print the JSON document on stdout instead of the table")
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
    if sweep:
        if any(workload[k] for k in ("shapes", "files", "presets", "recordings")):
            raise click.UsageError("--sweep runs its own problem table: drop --shape/--file/--preset/--from")
        _writable_dir(out_dir)  # before any timing: a bad --out must not cost the whole run
        src = click.get_current_context().get_parameter_source("seconds")
        run_sweep_command(dev, db=db, budget=budget, seconds=None if src.name == "DEFAULT" else seconds,
                          out_dir=out_dir, no_plot=no_plot, as_json=as_json, quick=quick, dry=dry)
        return
    if quick or dry:
        raise click.UsageError("--quick and --dry go with --sweep")
    items = gather(workload, dev)  # bad arguments first: a usage error leaves no output folder behind
    _writable_dir(out_dir)  # then, before any timing, the folder: a bad --out must not cost the whole run
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
        print_table(t)
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
    from ..sweep_report import within_noise
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
    noise = {k: _paired_speedup(samples["pytorch"], samples[k]) for k in samples if k != "pytorch"}
    if "single" not in noise:  # the single backend cannot run this: PyTorch's default stands in, ratio 1
        noise["single"] = (1.0, 1.0)
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
        **{f"{k}_speedup_{q}": noise[k][i] for k in ("autosdpa", "single") for i, q in enumerate(("p25", "p75"))},
        **{f"{k}_within_noise": within_noise(*noise[k]) for k in ("autosdpa", "single")},
        "rounds": len(samples["pytorch"]), "tflops_autosdpa": it.problem.flops / med["autosdpa"] / 1e12,
    }


def _paired_speedup(base: list[float], other: list[float]) -> tuple[float, float]:
    """p25 and p75 of the per-round speedup base/other (the rounds interleave them, so drift cancels)."""
    import statistics

    r = sorted(b / o for b, o in zip(base, other) if o > 0)
    if len(r) < 4:
        return r[0], r[-1]
    q = statistics.quantiles(r, n=4, method="inclusive")
    return q[0], q[2]


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
                  f"{r['autosdpa_backend']} {fmt_s(r['autosdpa_s'])}",
                  _noted(r["autosdpa_speedup"], r["autosdpa_within_noise"]),
                  f"{r['single_backend']} {fmt_s(r['single_s'])}",
                  _noted(r["single_speedup"], r["single_within_noise"]))
    t.add_section()
    t.add_row("[bold]geometric mean[/]", "", "", f"[bold]{fmt_x(summary['autosdpa_speedup_geomean'])}[/]", "",
              f"[bold]{fmt_x(summary['single_speedup_geomean'])}[/]")
    print_table(t)
