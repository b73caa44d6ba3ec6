"""``autosdpa tune``: offline tuning of a workload (shapes, files, presets, recordings), one problem at a time,
so that Ctrl-C keeps everything measured so far."""
from __future__ import annotations

import queue as _queue
import sys
import time

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ._group import main
from ._common import (budget_option, configure_dispatcher, current_store, db_option, device_option, err, fmt_s, fmt_x,
                      gather, json_option, out, print_json, print_note, print_table, resolve_device, settings_for,
                      short_key, shorten, tune_config, use_db, workload_options)


def _list_presets(ctx, _param, value):
    if not value or ctx.resilient_parsing:
        return
    from .presets import print_presets

    print_presets()
    ctx.exit(0)


def result_row(item, decision, elapsed: float, device: str) -> dict:
    d = decision
    win_s = d.timings.get(d.backend)
    torch_s = d.timings.get(d.pytorch_choice) if d.pytorch_choice else None
    return {
        "problem": d.problem or item.problem.key, "label": item.label, "origin": item.origin, "device": device,
        "winner": d.backend, "winner_s": win_s, "pytorch_choice": d.pytorch_choice, "pytorch_s": torch_s,
        "speedup": (torch_s / win_s) if win_s and torch_s else None, "source": d.source, "reason": d.reason,
        "timings": d.timings, "rejected": d.rejected, "elapsed_s": round(elapsed, 4), "error": None,
    }


def error_row(item, e: BaseException, elapsed: float, device: str) -> dict:
    return {"problem": item.problem.key, "label": item.label, "origin": item.origin, "device": device,
            "winner": None, "winner_s": None, "pytorch_choice": None, "pytorch_s": None, "speedup": None,
            "source": "error", "reason": f"{type(e).__name__}: {e}", "timings": {}, "rejected": {},
            "elapsed_s": round(elapsed, 4), "error": f"{type(e).__name__}: {e}"}


class InputsTooLarge(Exception):
    """The synthetic inputs of a problem alone would not fit in the free memory."""


def check_inputs_fit(problem, device) -> None:
    """Raise InputsTooLarge when making the problem's inputs would take more memory than the device has free
    (on a CPU the kernel would kill the process instead of raising)."""
    from .. import memory

    need, room = memory.problem_input_bytes(problem), memory.room(device)
    if room is not None and need > room[0]:
        raise InputsTooLarge(f"its inputs alone need ~{memory.fmt_bytes(need)}, {memory.fmt_bytes(room[1])} "
                             "free: not tuned")


def tune_one(item, device, force: bool, config) -> dict:
    """Tune one work item (saving its rows) -> a result row; errors become an error row."""
    from .. import api

    t0 = time.perf_counter()
    try:
        check_inputs_fit(item.problem, device)
        d = api.tune([item.problem], progress=False, device=device, force=force, config=config)[0]
        row = result_row(item, d, time.perf_counter() - t0, str(device))
        lost = current_store().stands_in_for  # (database, why): it failed, so these rows are in memory only
        row["unsaved"] = None
        if lost and d.source == "tuned":
            row["unsaved"] = lost[1] if lost[1].startswith(lost[0]) else f"{lost[0]}: {lost[1]}"
        return row
    except KeyboardInterrupt:
        raise
    except Exception as e:  # one bad problem (e.g. out of memory making inputs) must not stop the run
        return error_row(item, e, time.perf_counter() - t0, str(device))


def common_reasons(rows: list[dict], unavailable: dict[str, str]) -> dict[str, str]:
    """{backend: reason} rejected with the same reason in every problem (e.g. the NestedTensor backends for
    dense inputs): said once below the table rather than in every row."""
    done = [r for r in rows if not r["error"]]
    if len(done) < 2:
        return {}
    same = {b: why for b, why in done[0]["rejected"].items() if b not in unavailable}
    for r in done[1:]:
        same = {b: why for b, why in same.items() if r["rejected"].get(b) == why}
    return same


def results_table(rows: list[dict], unavailable: dict[str, str], title: str,
                  everywhere: dict[str, str] | None = None) -> Table:
    """One row per problem; ``everywhere`` (backend: reason of every row) is left to a line below."""
    from ..tuner import TIE_TOLERANCE

    skip = {**unavailable, **(everywhere or {})}

    t = Table(title=title, show_lines=False)
    t.add_column("problem", overflow="fold", max_width=44)
    t.add_column("winner")
    t.add_column("time", justify="right")
    t.add_column("PyTorch default", justify="right")
    t.add_column("speedup", justify="right")
    t.add_column("rejected (why)", overflow="fold", max_width=60)
    for r in rows:
        name = f"{r['label']}\n{short_key(r['problem'])}" if r["label"] else short_key(r["problem"])
        if r["error"]:
            t.add_row(name, "[red]error[/]", "-", "-", "-", Text(r["error"]))
            continue
        rej = "\n".join(f"{b}: {why}" for b, why in r["rejected"].items() if b not in skip)
        torch_cell = f"{r['pytorch_choice']} {fmt_s(r['pytorch_s'])}" if r["pytorch_choice"] else "-"
        sp = r["speedup"]
        sp_txt = fmt_x(sp) if sp is None else (f"[green]{fmt_x(sp)}[/]" if sp > 1 + TIE_TOLERANCE else fmt_x(sp))
        t.add_row(name, f"[bold]{r['winner']}[/]", fmt_s(r["winner_s"]), torch_cell, sp_txt, Text(rej))
    return t


def print_results(rows, unavailable, device, interrupted: bool, total: int) -> None:
    title = f"autosdpa tune on {device}: {len(rows)}/{total} problems"
    if interrupted:
        title += " (interrupted: rows above were saved)"
    everywhere = common_reasons(rows, unavailable)
    print_table(results_table(rows, unavailable, title, everywhere))
    sources: dict[str, int] = {}
    for r in rows:
        s = "unsaved" if r.get("unsaved") else r["source"]
        sources[s] = sources.get(s, 0) + 1
    names = {"tuned": "tuned now", "database": "already in the database", "cache": "already in memory",
             "error": "failed", "only": "with one eligible backend (nothing to time)",
             "unsaved": "tuned now but NOT saved"}
    out.print(", ".join(f"{n} {names.get(s, s)}" for s, n in sources.items()) or "nothing tuned")
    by_reason: dict[str, list[str]] = {}
    for b, why in everywhere.items():
        by_reason.setdefault(why, []).append(b)
    if by_reason:
        print_note("rejected for every problem above: "
                   + "; ".join(f"{', '.join(bs)} ({why})" for why, bs in by_reason.items()))
    if unavailable:
        print_note("not available on this device (not timed): "
                   + "; ".join(f"{b} ({w})" for b, w in unavailable.items()))


def _parse_devices(spec: str) -> list[int]:
    import torch

    try:
        idx = [int(x) for x in spec.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise click.BadParameter(f"{spec!r}: expected CUDA device indices like 0,1,2", param_hint="--devices") from None
    if not idx or any(i < 0 for i in idx) or len(set(idx)) != len(idx):
        raise click.BadParameter(f"{spec!r}: expected distinct CUDA device indices like 0,1,2",
                                 param_hint="--devices")
    if not torch.cuda.is_available():
        raise click.BadParameter(f"{spec!r}: CUDA is not available on this machine (torch {torch.__version__}); "
                                 "--devices starts one worker per GPU. Tune on the CPU with --device cpu",
                                 param_hint="--devices")
    n = torch.cuda.device_count()
    bad = [i for i in idx if i >= n]
    if bad:
        raise click.BadParameter(f"{spec!r}: this machine has {n} CUDA device(s) (0..{n - 1})",
                                 param_hint="--devices")
    return idx


@main.command()
@workload_options
@db_option("Database to write")
@device_option("Device to tune on")
@click.option("--devices", default=None, metavar="0,1,...", show_default="one device",
              help="Tune on several GPUs at once: one worker process per listed CUDA device.")
@click.option("--force", is_flag=True, help="Re-tune problems that already have measurements.")
@budget_option()
@click.option("--shard", default=None, metavar="I/N", show_default="all of the workload",
              help="Tune only shard I of N (0 <= I < N), split deterministically by problem key: run one per "
                   "machine against one shared --db.")
@click.option("--dry-run", is_flag=True, help="List the problems that would be tuned, and stop.")
@json_option("Machine-readable results on stdout (progress on stderr)")
@click.option("--list-presets", is_flag=True, expose_value=False, is_eager=True, callback=_list_presets,
              help="List the shipped presets and exit.")
def tune(workload, db, device, devices, force, budget, shard, dry_run, as_json) -> None:
    """Time every eligible backend for each problem, save all measurements, and show the winners.

    Problems come from any mix of --shape, --file, --preset and --from. Each problem is tuned and saved
    before the next starts: Ctrl-C prints what was measured and exits with status 130, keeping those rows.

    \b
    Examples:
      autosdpa tune --shape b=8,hq=32,hkv=8,lq=4096,d=128,dtype=bf16,causal
      autosdpa tune --preset llama3-8b --budget 2
      AUTOSDPA_RECORD=seen.jsonl python train.py && autosdpa tune --from seen.jsonl
      autosdpa tune --file workload.toml --devices 0,1,2,3 --db /shared/autosdpa.sqlite
      autosdpa tune --preset sd15-unet --shard 0/2 --db postgresql://host/autosdpa --json
    """
    from .. import workload as W
    from ..api import unavailable_reasons

    if devices and device:
        raise click.UsageError("use either --device or --devices, not both")
    gpu_ids = _parse_devices(devices) if devices else None
    dev = resolve_device(f"cuda:{gpu_ids[0]}" if gpu_ids else device)
    shard_t = None
    if shard:
        try:
            shard_t = W.parse_shard(shard)
        except W.WorkloadError as e:
            raise click.BadParameter(str(e), param_hint="--shard") from None
    items = gather(workload, dev, shard=shard_t)
    if dry_run:
        _print_plan(items, as_json)
        return
    use_db(db)
    config = tune_config(budget)
    unavailable = unavailable_reasons(dev)
    rows: list[dict] = []
    interrupted = False
    progress = Progress(TextColumn("[bold]tuning[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.description}"), console=err, transient=False)
    try:
        with progress:
            task = progress.add_task("", total=len(items))
            if gpu_ids and len(gpu_ids) > 1:
                _run_workers(items, [f"cuda:{g}" for g in gpu_ids], force, config, rows, progress, task,
                             settings=settings_for(db))
            else:
                for it in items:
                    progress.update(task, description=shorten(it.label or short_key(it.problem.key), 60))
                    rows.append(tune_one(it, dev, force, config))
                    progress.advance(task)
                progress.update(task, description="done")
    except KeyboardInterrupt:
        interrupted = True
        err.print("[yellow]interrupted: keeping the measurements saved so far[/]")
    if as_json:
        print_json({"device": str(dev) if not gpu_ids else [f"cuda:{i}" for i in gpu_ids],
                    "database": _db_display(), "interrupted": interrupted, "planned": len(items),
                    "unavailable": unavailable, "results": rows})
    else:
        print_results(rows, unavailable, dev if not gpu_ids else ",".join(f"cuda:{i}" for i in gpu_ids),
                      interrupted, len(items))
    unsaved = [r for r in rows if r.get("unsaved")]
    if unsaved:  # the dispatcher fell back to memory: say so, never "tuned" with status 0
        click.echo(f"Error: could not save to {unsaved[0]['unsaved']}; the measurements of {len(unsaved)} "
                   "problem(s) were kept in memory only and are lost at exit: "
                   + ", ".join(r["problem"] for r in unsaved), err=True)
    if interrupted:
        sys.exit(130)
    if unsaved:
        sys.exit(1)
    if any(r["error"] for r in rows):
        err.print(f"[red]{sum(bool(r['error']) for r in rows)} problem(s) failed[/]")
        sys.exit(1)


def _db_display() -> str:
    return current_store().display_url


def _print_plan(items, as_json: bool) -> None:
    from ..workload import canonical

    if as_json:
        print_json([{"problem": it.problem.key, "key": canonical(it.problem).key, "label": it.label,
                     "origin": it.origin} for it in items])
        return
    t = Table(title=f"{len(items)} problem(s)")
    t.add_column("#", justify="right")
    t.add_column("label")
    t.add_column("problem key (as stored)", overflow="fold")
    t.add_column("from")
    for i, it in enumerate(items, 1):
        t.add_row(str(i), it.label, canonical(it.problem).key, it.origin)
    print_table(t)


# -- several GPUs ---------------------------------------------------------------------------------------------

def _worker(device: str, tasks, results, force: bool, config, settings) -> None:
    """One process per GPU: pull (index, item) from ``tasks`` until the sentinel, push result rows. The
    parent's settings (its database) come as an argument: nobody writes ``os.environ``."""
    import signal

    import torch

    configure_dispatcher(settings)

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    try:
        while True:
            job = tasks.get()
            if job is None:
                break
            i, item = job
            results.put((i, tune_one(item, torch.device(device), force, config)))
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    finally:
        results.put(("exit", device))


def _run_workers(items, devices: list[str], force, config, rows, progress, task, *, settings) -> None:
    """Tune ``items`` with one spawned worker process per device, results in workload order into ``rows``;
    each worker uses ``settings`` (the parent's, with its --db)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for i, it in enumerate(items):
        tasks.put((i, it))
    for _ in devices:
        tasks.put(None)
    procs = [ctx.Process(target=_worker, args=(d, tasks, results, force, config, settings), daemon=True)
             for d in devices]
    for p in procs:
        p.start()
    by_index: dict[int, dict] = {}
    alive = len(procs)
    try:
        while alive:
            try:
                i, row = results.get(timeout=1.0)
            except _queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            if i == "exit":
                alive -= 1
                continue
            by_index[i] = row
            progress.update(task, description=f"{row['device']}: {shorten(row['label'] or short_key(row['problem']), 50)}")
            progress.advance(task)
    except KeyboardInterrupt:
        # The workers got the same SIGINT: each stops after saving what it finished. Collect what came back.
        deadline = time.time() + 10
        while time.time() < deadline and any(p.is_alive() for p in procs):
            try:
                i, row = results.get(timeout=0.5)
                if i != "exit":
                    by_index[i] = row
            except _queue.Empty:
                pass
        for p in procs:
            if p.is_alive():
                p.terminate()
        rows.extend(by_index[i] for i in sorted(by_index))
        raise
    finally:
        for p in procs:
            p.join(timeout=5)
    rows.extend(by_index[i] for i in sorted(by_index))
    dead = [p for p in procs if p.exitcode not in (0, None)]
    if dead:
        err.print(f"[red]{len(dead)} worker(s) exited abnormally (exit codes {[p.exitcode for p in dead]})[/]")
    missing = len(items) - len(by_index)
    if missing:
        err.print(f"[red]{missing} problem(s) got no result from the workers[/]")

