"""``autosdpa db``: inspect, export, import, merge and prune tuning databases (logic in ``autosdpa.sharing``)."""
from __future__ import annotations

import datetime as _dt
import json

import re

import click

from . import main

_DB_HELP = "Database to use (file path or SQLAlchemy URL); default: AUTOSDPA_DB, else the user cache file."


def _fail(e: Exception) -> None:
    raise click.ClickException(str(e))


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



def _printable(v):
    return re.sub(r"[\x00-\x1f\x7f]", "?", v) if isinstance(v, str) else v

@main.group()
def db() -> None:
    """Share tuning databases: info, export, import, merge, prune.

    A tuning file is a plain SQLite database (same schema as your own). Everything read from a file is
    validated; bad rows are skipped and counted. Every command reports added / replaced / kept / rejected.

    Example: autosdpa db export --gpu H100 -o h100.sqlite && autosdpa db import h100.sqlite
    """


@db.command("info")
@click.argument("target", metavar="FILE_OR_URL")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info_cmd(target: str, as_json: bool) -> None:
    """Schema version, environments, row counts and rows that would be rejected. Never writes to FILE.

    Example: autosdpa db info tuning_db/h100.sqlite
    """
    from ..sharing import info
    from ..store import StoreError

    try:
        data = info(target)
    except StoreError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    click.echo(f"{data['database']}: schema version {data['schema_version']}, "
               f"{data['counts']['environments']} environments, {data['counts']['measurements']} rows, "
               f"{data['counts'].get('decisions', 0)} decisions")
    if data.get("newest_measurement"):
        click.echo(f"newest measurement: {_dt.datetime.fromtimestamp(data['newest_measurement']):%Y-%m-%d %H:%M}")
    for e in data["environments"]:  # fields of a file from elsewhere: no control characters to the terminal
        e = {k: _printable(v) for k, v in e.items()}
        dev = e["device_name"] + (f" (sm {e['capability']})" if e["device_type"] == "cuda" else "")
        click.echo(f"  {e['fingerprint']}  {e['device_type']:<4} {dev}  torch {e['torch']}"
                   + (f" cuda {e['cuda']}" if e["cuda"] else "") + f" kernels {e['kernels']}: "
                   f"{e['problems']} problems, {e['ok']} ok, {e['rejected']} rejected, {e['skipped']} skipped"
                   + (f", {e['unknown_backends']} of unknown backends" if e["unknown_backends"] else ""))
    click.echo(f"valid rows {data['valid_rows']}, rejected {data['rejected']}")
    for r, n in sorted(data["reasons"].items(), key=lambda kv: -kv[1]):
        click.echo(f"  rejected {n}: {r}")


@db.command("export")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="New SQLite file to write.")
@click.option("--db", "source", default=None, help="Database to export from. " + _DB_HELP)
@click.option("--device", "--gpu", "device", default=None,
              help="Only environments whose device name contains this (case-insensitive), or of this device "
                   "type (cuda, cpu), or with this fingerprint.")
@click.option("--since", default=None, help="Only rows measured since: YYYY-MM-DD[THH:MM] or an age like 30d.")
@click.option("--ok-only", is_flag=True, help="Leave out rejected/skipped rows.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def export_cmd(output: str, source: str | None, device: str | None, since: str | None, ok_only: bool,
               force: bool, as_json: bool) -> None:
    """Write your measurements (validated, optionally filtered) to a self-contained SQLite file to share.

    Example: autosdpa db export --gpu H100 --since 2025-01-01 -o h100.sqlite
    """
    from ..sharing import export
    from ..store import StoreError

    try:
        report = export(source, output, device=device, since=_time(since, "--since"), include_failed=not ok_only,
                        force=force)
    except StoreError as e:
        _fail(e)
    _report(f"exported to {output}", report, as_json=as_json)


@db.command("import")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("--db", "target", default=None, help="Database to import into. " + _DB_HELP)
@click.option("--allow-unknown-backends", is_flag=True,
              help="Keep rows of backends this install does not know (well-formed names only).")
@click.option("--dry-run", is_flag=True, help="Report what would change; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def import_cmd(files: tuple[str, ...], target: str | None, allow_unknown_backends: bool, dry_run: bool,
               as_json: bool) -> None:
    """Merge tuning files into your database with the conflict rule (more samples wins, then newer).

    Example: autosdpa db import h100.sqlite --dry-run
    """
    from ..sharing import Report, import_file
    from ..store import StoreError

    total = Report()
    for f in files:
        try:
            r = import_file(f, target, allow_unknown_backends=allow_unknown_backends, dry_run=dry_run)
        except StoreError as e:
            _fail(e)
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
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def merge_cmd(files: tuple[str, ...], output: str, allow_unknown_backends: bool, force: bool,
              as_json: bool) -> None:
    """Merge tuning files, in order, into a new file (conflict rule: more samples wins, then newer).

    Example: autosdpa db merge node1.sqlite node2.sqlite -o fleet.sqlite
    """
    from ..sharing import merge_files
    from ..store import StoreError

    try:
        total, each = merge_files(list(files), output, force=force, allow_unknown_backends=allow_unknown_backends)
    except StoreError as e:
        _fail(e)
    if as_json:
        _report("", total, as_json=True, extra={"files": {n: r.as_dict() for n, r in each}})
        return
    for name, r in each:
        _report(f"  {name}", r)
    click.echo(f"merged into {output}: {total.line()}")


@db.command("prune")
@click.option("--db", "target", default=None, help="Database to prune. " + _DB_HELP)
@click.option("--other-torch", is_flag=True, help="Drop environments measured with another torch version.")
@click.option("--old-kernels", is_flag=True, help="Drop environments measured with other autosdpa kernel versions.")
@click.option("--failed", is_flag=True, help="Drop rows that did not measure ok (rejected, skipped).")
@click.option("--older-than", default=None, help="Drop rows measured before: YYYY-MM-DD or an age like 90d.")
@click.option("--decisions", is_flag=True, help="Drop rank decisions (distributed runs re-agree on next use).")
@click.option("--device", "--gpu", "device", default=None, help="Only environments matching this device filter.")
@click.option("--dry-run", is_flag=True, help="Report what would be removed; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def prune_cmd(target: str | None, other_torch: bool, old_kernels: bool, failed: bool, older_than: str | None,
              decisions: bool, device: str | None, dry_run: bool, as_json: bool) -> None:
    """Drop stale data. With no selection, drops environments of other torch versions and old kernels.

    Example: autosdpa db prune --other-torch --failed --older-than 180d --dry-run
    """
    from ..sharing import prune
    from ..store import StoreError

    cutoff = _time(older_than, "--older-than")
    if not (other_torch or old_kernels or failed or cutoff is not None or decisions):
        other_torch = old_kernels = True
    try:
        report = prune(target, other_torch=other_torch, old_kernels=old_kernels, failed=failed, older_than=cutoff,
                       decisions=decisions, device=device, dry_run=dry_run)
    except StoreError as e:
        _fail(e)
    if as_json:
        _report("", report, as_json=True, extra={"dry_run": dry_run})
        return
    click.echo(f"{'would remove' if dry_run else 'removed'} {report.removed} rows and "
               f"{report.environments_removed} environments; kept {report.kept} rows "
               f"(added 0, replaced 0, rejected 0)")
