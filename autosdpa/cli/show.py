"""``autosdpa show``: what the tuning database holds."""
from __future__ import annotations

import fnmatch
import math

import click
from rich.table import Table
from rich.text import Text

from ._group import main
from ._common import (db_name, db_option, err, fmt_s, gpu_filter_option, json_option, print_json, print_note,
                      print_table, read_db, short_key)


def _wanted_backends(spec: str | None, seen: set[str]) -> set[str] | None:
    """``--backend a,b`` -> names; a name neither registered nor in the data is a bad parameter (exit 2)."""
    if not spec:
        return None
    from ..validation import known_backends

    wanted = {b.strip() for b in spec.split(",") if b.strip()}
    unknown = sorted(wanted - known_backends() - seen)
    if unknown:
        raise click.BadParameter(f"unknown backend {', '.join(map(repr, unknown))}; known: "
                                 f"{', '.join(sorted(known_backends() | seen))}", param_hint="--backend")
    return wanted


def _collect(layers, gpu, key_glob, backends) -> list[tuple]:
    """(layer name, env, key, measurement) of every valid row passing the filters, layer by layer."""
    from ..sharing import env_matches
    from ..store import StoreError
    from ..validation import environment_error, measurement_error

    rows, seen = [], set()
    for layer_name, layer in layers:
        env_fp, env_ok = None, False
        try:
            for env, key, m in layer.iter_rows():
                if env["fingerprint"] != env_fp:  # rows come grouped by environment
                    env_fp = env["fingerprint"]
                    env_ok = environment_error(env) is None and env_matches(env, gpu)
                # rows from elsewhere are data: what fails validation is not shown either
                if not env_ok or measurement_error(m) is not None:
                    continue
                seen.add(m.backend)
                if key_glob and not fnmatch.fnmatchcase(key, key_glob) and key_glob not in key:
                    continue
                rows.append((layer_name, env, key, m))
        except StoreError as e:
            raise click.ClickException(str(e)) from None
    wanted = _wanted_backends(backends, seen)
    return [r for r in rows if wanted is None or r[3].backend in wanted]


@main.command()
@db_option("Database to read")
@gpu_filter_option
@click.option("--key", "key_glob", default=None, metavar="GLOB", show_default="every key",
              help="Only problem keys matching this glob (or containing this text), e.g. '*Hq=32*' or 'fwdbwd|*'.")
@click.option("--backend", "backends", default=None, metavar="NAME[,NAME]", show_default="every backend",
              help="Only these backends.")
@click.option("--shared", is_flag=True, help="Also list the read-only shared layers (shipped tuning_db/, "
              "$AUTOSDPA_SHARED_DBS).")
@json_option("Machine-readable rows on stdout")
def show(db, gpu, key_glob, backends, shared, as_json) -> None:
    """List stored measurements: problem, backend, status, median, samples, error vs reference, device.

    The fastest passing backend of each problem is starred; environments of one device say what differs
    between them (e.g. torch 2.12.0 → 2.13.0).

    \b
    Examples:
      autosdpa show
      autosdpa show --gpu H100 --key '*Hq=32*' --backend flash,cudnn
    """
    store = read_db(db)  # only reads: a database that does not exist yet is not created
    layers = [("user", store)] + ([(s.display_url, s) for s in store.shared] if shared else [])
    rows = _collect(layers, gpu, key_glob, backends)
    best: dict[tuple, tuple[float, str]] = {}
    for layer, env, key, m in rows:
        if m.ok:
            g = (layer, env["fingerprint"], key)
            if g not in best or m.median_s < best[g][0]:
                best[g] = (m.median_s, m.backend)
    if as_json:
        print_json([{"layer": layer, "environment": env, "problem": key, "backend": m.backend, "status": m.status,
                     "median_s": m.median_s, "spread_s": m.spread_s, "samples": m.samples,
                     "max_error": m.max_error, "detail": m.detail, "tuned_shape": m.tuned_shape,
                     "measured_at": m.measured_at,
                     "fastest": best.get((layer, env["fingerprint"], key), (0, None))[1] == m.backend}
                    for layer, env, key, m in rows])
        return
    if not rows:
        err.print(f"no measurements in {db_name(store)}" + (" matching the filters" if
                                                                (gpu or key_glob or backends) else ""))
        return
    print_table(_table(rows, best, db_name(store)))
    _print_environments(layers, {env["fingerprint"]: env for _l, env, _k, _m in rows})


def _table(rows, best, title: str) -> Table:
    any_detail = any(m.detail for *_, m in rows)
    t = Table(title=f"{title}: {len(rows)} measurement(s)")
    t.add_column("problem", overflow="fold", max_width=40)
    for name, justify in (("backend", "left"), ("status", "left"), ("median", "right"), ("samples", "right"),
                          ("error", "right"), ("env", "left")):
        t.add_column(name, justify=justify)
    if any_detail:
        t.add_column("detail", overflow="fold", max_width=60)
    prev = None
    for layer, env, key, m in rows:
        g = (layer, env["fingerprint"], key)
        if prev is not None and g != prev:
            t.add_section()
        star = best.get(g, (0, None))[1] == m.backend
        status = {"ok": "[green]ok[/]", "rejected": "[red]rejected[/]"}.get(m.status, f"[yellow]{m.status}[/]")
        err_txt = "-" if m.max_error is None or not math.isfinite(m.max_error) else f"{m.max_error:.2g}"
        where = env["fingerprint"][:8] + ("" if layer == "user" else " (shared)")
        cells = [short_key(key) if g != prev else "", f"[bold]{m.backend} ★[/]" if star else m.backend, status,
                 fmt_s(m.median_s), str(m.samples), err_txt, where if g != prev else ""]
        if any_detail:
            cells.append(Text(m.detail))
        t.add_row(*cells)
        prev = g
    return t


def _print_environments(layers, shown: dict[str, dict]) -> None:
    """One line per environment shown, and what differs from an older environment of the same device."""
    from ..sharing import env_differences
    from ..store import StoreError

    envs = {}
    for _name, layer in layers:
        try:
            envs.update({e["fingerprint"]: e for e in layer.iter_environments()})
        except StoreError:
            continue
    diffs = env_differences(e for fp, e in envs.items() if fp in shown)
    for fp, env in shown.items():
        line = (f"env {fp[:8]}: {env['device_name']} ({env['device_type']}"
                + (f" {env['capability']}" if env["capability"] else "")
                + f", torch {env['torch']}" + (f", CUDA {env['cuda']}" if env["cuda"] else "")
                + (f", triton {env['triton']}, kernels {env['kernels']}" if env["kernels"] else "") + ")")
        if fp in diffs:
            line += f"; {diffs[fp]}"
        print_note(line)
