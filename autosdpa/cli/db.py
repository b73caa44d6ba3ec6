"""``autosdpa db``: inspect, export, import, merge and prune tuning databases (logic in ``autosdpa.sharing``)."""
from __future__ import annotations

import datetime as _dt
import json

import click

from ._group import main
from ._common import db_option, gpu_filter_option, json_option, settings_for


def _report(prefix: str, report, *, as_json: bool = False, extra: dict | None = None) -> None:
    if as_json:
        click.echo(json.dumps({**(extra or {}), **report.as_dict()}, indent=2))
        return
    click.echo(f"{prefix}: {report.line()}")
    for line in report.reason_lines():
        click.echo(line)


def _time(value: str | None, param: str) -> float | None:
    if value is None:
        return None
    from ..sharing import parse_time

    try:
        return parse_time(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=param) from None


def _run(fn, *args, **kwargs):
    """Call a sharing function; a database or file that cannot be used is ``Error: ...``, exit status 1."""
    from ..store import StoreError

    try:
        return fn(*args, **kwargs)
    except StoreError as e:
        raise click.ClickException(str(e)) from None


@main.group()
def db() -> None:
    """Share tuning databases: info, export, import, merge, prune.

    A tuning file is a plain SQLite database (same schema as your own). Everything read from a file is
    validated; bad rows are skipped and counted. Every command reports added / replaced / kept / rejected.

    Example: autosdpa db export --gpu H100 -o h100.sqlite && autosdpa db import h100.sqlite
    """


def _env_line(e: dict) -> str:
    from ..text import printable

    e = {k: printable(v) for k, v in e.items()}  # fields of a file from elsewhere: no control characters
    dev = e["device_name"] + (f" (sm {e['capability']})" if e["device_type"] == "cuda" else "")
    versions = f"torch {e['torch']}" + (f" cuda {e['cuda']}" if e["cuda"] else "") + (
        f" triton {e['triton']} kernels {e['kernels']}" if e["kernels"] else "")
    line = (f"  {e['fingerprint']}  {e['device_type']:<4} {dev}  {versions}: {e['problems']} problems, "
            f"{e['ok']} ok, {e['rejected']} rejected, {e['skipped']} skipped"
            + (f", {e['unknown_backends']} of unknown backends" if e["unknown_backends"] else ""))
    if e.get("invalid"):
        line += f"  [invalid: {e['invalid']}]"
    if e.get("differs"):
        line += f"\n      {e['differs']}"
    return line


@db.command("info")
@click.argument("target", metavar="FILE_OR_URL")
@json_option()
def info_cmd(target: str, as_json: bool) -> None:
    """Schema version, environments (and what differs between environments of one device), row counts and
    rows that would be rejected. Never writes to FILE; a file name is a path, even with '?' or '#' in it.

    Example: autosdpa db info tuning_db/h100.sqlite
    """
    from ..sharing import info

    data = _run(info, target, timeout_s=settings_for().db_timeout_s)
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    click.echo(f"{data['database']}: schema version {data['schema_version']}, "
               f"{data['counts']['environments']} environments, {data['counts']['measurements']} rows, "
               f"{data['counts'].get('decisions', 0)} decisions")
    if data.get("newest_measurement"):
        click.echo(f"newest measurement: {_dt.datetime.fromtimestamp(data['newest_measurement']):%Y-%m-%d %H:%M}")
    for e in data["environments"]:
        click.echo(_env_line(e))
    click.echo(f"valid rows {data['valid_rows']}, rejected {data['rejected']}")
    for r, n in sorted(data["reasons"].items(), key=lambda kv: -kv[1]):
        click.echo(f"  rejected {n}: {r}")


@db.command("export")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="New SQLite file to write.")
@db_option("Database to export from", dest="source")
@gpu_filter_option
@click.option("--since", default=None, metavar="DATE|AGE", show_default="every row",
              help="Only rows measured since: YYYY-MM-DD[THH:MM] or an age like 30d.")
@click.option("--ok-only", is_flag=True, help="Leave out rejected/skipped rows.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@json_option("Print the report as JSON")
def export_cmd(output: str, source: str | None, gpu: str | None, since: str | None, ok_only: bool,
               force: bool, as_json: bool) -> None:
    """Write your measurements (validated, optionally filtered) to a self-contained SQLite file to share.

    Example: autosdpa db export --gpu H100 --since 2025-01-01 -o h100.sqlite
    """
    from ..sharing import export

    settings = settings_for(source)
    report = _run(export, settings.db, output, gpu=gpu, since=_time(since, "--since"), include_failed=not ok_only,
                  force=force, timeout_s=settings.db_timeout_s)
    _report(f"exported to {output}", report, as_json=as_json)


@db.command("import")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@db_option("Database to import into", dest="target")
@click.option("--allow-unknown-backends", is_flag=True,
              help="Keep rows of backends this install does not know (well-formed names only).")
@click.option("--dry-run", is_flag=True, help="Report what would change; write nothing.")
@json_option("Print the report as JSON")
def import_cmd(files: tuple[str, ...], target: str | None, allow_unknown_backends: bool, dry_run: bool,
               as_json: bool) -> None:
    """Merge tuning files into your database with the conflict rule (more samples wins, then newer).

    Example: autosdpa db import h100.sqlite --dry-run
    """
    from ..sharing import Report, import_file

    settings = settings_for(target)
    total = Report()
    for f in files:
        r = _run(import_file, f, settings.db, allow_unknown_backends=allow_unknown_backends, dry_run=dry_run,
                 timeout_s=settings.db_timeout_s)
        total += r
        if not as_json:
            _report(f"{'would import' if dry_run else 'imported'} {f}", r)
    if as_json:
        _report("", total, as_json=True, extra={"dry_run": dry_run})
    elif len(files) > 1:
        click.echo(f"total: {total.line()}")


@db.command("merge")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="New SQLite file to write.")
@click.option("--allow-unknown-backends", is_flag=True,
              help="Keep rows of backends this install does not know (well-formed names only).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@json_option("Print the report as JSON")
def merge_cmd(files: tuple[str, ...], output: str, allow_unknown_backends: bool, force: bool,
              as_json: bool) -> None:
    """Merge tuning files, in order, into a new file (conflict rule: more samples wins, then newer).

    Example: autosdpa db merge node1.sqlite node2.sqlite -o fleet.sqlite
    """
    from ..sharing import merge_files

    total, each = _run(merge_files, list(files), output, force=force, allow_unknown_backends=allow_unknown_backends,
                       timeout_s=settings_for().db_timeout_s)
    if as_json:
        _report("", total, as_json=True, extra={"files": {n: r.as_dict() for n, r in each}})
        return
    for name, r in each:
        _report(f"  {name}", r)
    click.echo(f"merged into {output}: {total.line()}")


@db.command("prune")
@db_option("Database to prune", dest="target")
@click.option("--stale", is_flag=True, help="Drop environments this machine can never match again: its own "
              "devices with an older torch/CUDA/cuDNN, or kernels/Triton other than the installed ones.")
@click.option("--other-torch", is_flag=True, help="Drop environments measured with another torch version.")
@click.option("--old-kernels", is_flag=True, help="Drop environments of kernel sources other than the installed.")
@click.option("--failed", is_flag=True, help="Drop rows that did not measure ok (rejected, skipped).")
@click.option("--older-than", default=None, metavar="DATE|AGE", show_default="no age limit",
              help="Drop rows measured before: YYYY-MM-DD or an age like 90d.")
@click.option("--decisions", is_flag=True, help="Drop rank decisions (distributed runs re-agree on next use).")
@gpu_filter_option
@click.option("--dry-run", is_flag=True, help="Report what would be removed; change nothing.")
@json_option("Print the report as JSON")
def prune_cmd(target: str | None, stale: bool, other_torch: bool, old_kernels: bool, failed: bool,
              older_than: str | None, decisions: bool, gpu: str | None, dry_run: bool, as_json: bool) -> None:
    """Drop stale data. With no selection, drops the environments this machine can never match again (--stale).

    Selections combine as a union: a row goes if ANY given selection matches it (--stale --failed drops
    stale environments and also every failed row elsewhere). --gpu, in contrast, narrows every selection to
    the matching environments. Try --dry-run first.

    Example: autosdpa db prune --stale --failed --older-than 180d --dry-run
    """
    from ..sharing import prune

    cutoff = _time(older_than, "--older-than")
    if not (stale or other_torch or old_kernels or failed or cutoff is not None or decisions):
        stale = True
    settings = settings_for(target)
    report = _run(prune, settings.db, stale=stale, other_torch=other_torch, old_kernels=old_kernels, failed=failed,
                  older_than=cutoff, decisions=decisions, gpu=gpu, dry_run=dry_run, timeout_s=settings.db_timeout_s)
    if as_json:
        _report("", report, as_json=True, extra={"dry_run": dry_run})
        return
    click.echo(report.prune_line(dry_run))
    for line in report.dropped:
        click.echo(f"  {'would drop' if dry_run else 'dropped'} {line}")
