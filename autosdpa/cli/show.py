"""``autosdpa show``: what the tuning database holds."""
from __future__ import annotations

import fnmatch
import math

import click
from rich.table import Table
from rich.text import Text

from . import main
from ._common import err, fmt_s, out, print_json, short_key, shorten, use_db


def _match_device(env: dict, pattern: str) -> bool:
    p = pattern.strip().lower()
    if p in ("cpu", "cuda"):
        return env["device_type"] == p
    if p.startswith("cuda:") or p.isdigit():  # an index names a device on *this* machine: match its name
        try:
            import torch

            idx = int(p.split(":")[-1])
            if torch.cuda.is_available() and idx < torch.cuda.device_count():
                p = torch.cuda.get_device_name(idx).lower()
        except (ValueError, RuntimeError):
            pass
    return p in str(env["device_name"]).lower() or env["fingerprint"].startswith(p)


@main.command()
@click.option("--db", default=None, metavar="PATH|URL", help="Database to read (default: $AUTOSDPA_DB, else the "
              "user cache file).")
@click.option("--device", default=None, help="Only this device: cpu, cuda, a name fragment (e.g. H100), or an "
              "environment fingerprint prefix.")
@click.option("--key", "key_glob", default=None, metavar="GLOB",
              help="Only problem keys matching this glob, e.g. '*Hq=32*' or 'fwdbwd|*'.")
@click.option("--backend", "backends", default=None, metavar="NAME[,NAME]", help="Only these backends.")
@click.option("--shared", is_flag=True, help="Also list the read-only shared layers (shipped tuning_db/, "
              "$AUTOSDPA_SHARED_DBS).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable rows on stdout.")
def show(db, device, key_glob, backends, shared, as_json) -> None:
    """List stored measurements: problem, backend, status, median, samples, error vs reference, device.

    The fastest passing backend of each problem is starred.

    \b
    Examples:
      autosdpa show
      autosdpa show --device H100 --key '*Hq=32*' --backend flash,cudnn
    """
    from .. import dispatch
    from ..store import StoreError, environment_problem

    use_db(db)
    store = dispatch.get_store()
    layers = [("user", store)] + ([("shared", s) for s in store.shared] if shared else [])
    wanted = {b.strip() for b in backends.split(",") if b.strip()} if backends else None
    rows = []
    for layer_name, layer in layers:
        try:
            got = layer.rows()
        except StoreError as e:
            raise click.ClickException(str(e)) from None
        for env, key, m in got:
            try:  # rows from elsewhere are data: what fails validation is not shown either
                m.validate()
            except ValueError:
                continue
            if environment_problem(env):
                continue
            if device and not _match_device(env, device):
                continue
            if key_glob and not fnmatch.fnmatchcase(key, key_glob) and key_glob not in key:
                continue
            if wanted and m.backend not in wanted:
                continue
            rows.append((layer_name if layer is store else layer.display_url, env, key, m))
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
        err.print(f"no measurements in {store.display_url}" + (" matching the filters" if
                                                                (device or key_glob or backends) else ""))
        return
    any_detail = any(m.detail for *_, m in rows)
    t = Table(title=f"{store.display_url}: {len(rows)} measurement(s)")
    t.add_column("problem", overflow="fold", max_width=40)
    t.add_column("backend")
    t.add_column("status")
    t.add_column("median", justify="right")
    t.add_column("samples", justify="right")
    t.add_column("error", justify="right")
    t.add_column("env")
    if any_detail:
        t.add_column("detail", overflow="fold", max_width=40)
    prev = None
    envs: dict[str, dict] = {}
    for layer, env, key, m in rows:
        g = (layer, env["fingerprint"], key)
        envs[env["fingerprint"]] = env
        if prev is not None and g != prev:
            t.add_section()
        star = best.get(g, (0, None))[1] == m.backend
        status = {"ok": "[green]ok[/]", "rejected": "[red]rejected[/]"}.get(m.status, f"[yellow]{m.status}[/]")
        err_txt = "-" if m.max_error is None or not math.isfinite(m.max_error) else f"{m.max_error:.2g}"
        where = env["fingerprint"][:8] + ("" if layer == "user" else " (shared)")
        cells = [short_key(key) if g != prev else "", f"[bold]{m.backend} ★[/]" if star else m.backend, status,
                 fmt_s(m.median_s), str(m.samples), err_txt, where if g != prev else ""]
        if any_detail:
            cells.append(Text(shorten(m.detail, 80)))
        t.add_row(*cells)
        prev = g
    out.print(t)
    for fp, env in envs.items():
        out.print(Text(f"env {fp[:8]}: {env['device_name']} ({env['device_type']}"
                       + (f" {env['capability']}" if env["capability"] else "")
                       + f", torch {env['torch']}" + (f", CUDA {env['cuda']}" if env["cuda"] else "") + ")",
                       style="dim"))
