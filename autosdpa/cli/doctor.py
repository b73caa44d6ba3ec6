"""``autosdpa doctor``: what this machine can run, and where the measurements live."""
from __future__ import annotations

import click
from rich.table import Table
from rich.text import Text

from ._group import main
from ._common import (cli_settings, db_name, device_option, json_option, print_json, print_table, read_db,
                      resolve_device)

#: environment fields as the table names them, in this order (others follow under their own names)
_FIELD_NAMES = {"device_type": "device type", "device_name": "device", "capability": "capability",
                "cores": "cores / SMs", "memory_gb": "device memory (GB)", "torch": "torch", "cuda": "CUDA",
                "cudnn": "cuDNN", "triton": "Triton", "kernels": "autosdpa kernels (source hash)"}


def _database_report(store) -> dict:
    """Row counts of the user's database and of each shared layer, from ``read_db`` (read-only: a database that
    does not exist yet is reported as such, not created; the first tuning creates it)."""
    from ..store import StoreError

    def counts(s):
        try:
            return s.counts()
        except StoreError as e:  # doctor reports trouble rather than dying of it
            return {"error": str(e)}
    mine = {"missing": "not created yet: the first tuning creates it"} if store.stands_in_for else counts(store)
    return {"database": db_name(store), "counts": mine,
            "shared": [{"database": s.display_url, "counts": counts(s)} for s in store.shared]}


def environment_table(fp: str, kfp: str, kinfo: dict, hot_path: str, free: str) -> Table:
    t = Table(title="environment", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("fingerprint (PyTorch's backends)", fp)
    t.add_row("fingerprint (autosdpa's kernels)", kfp)
    for k in [*_FIELD_NAMES, *(k for k in kinfo if k not in _FIELD_NAMES)]:
        v = kinfo.get(k)
        if v not in (None, "", 0) or k in ("torch", "device_name"):
            t.add_row(_FIELD_NAMES.get(k, k), Text(str(v)))
    t.add_row("memory free for tuning", free)
    t.add_row("hot path", hot_path)
    return t


def backends_table(dev, backends: list[dict]) -> Table:
    t = Table(title=f"backends on {dev}")
    t.add_column("backend", style="bold")
    t.add_column("available")
    t.add_column("why not", overflow="fold", max_width=70)
    for b in backends:
        t.add_row(b["backend"], "[green]yes[/]" if b["available"] else "[red]no[/]", Text(b["why_not"]))
    return t


def databases_table(db: dict) -> Table:
    t = Table(title="tuning databases")
    t.add_column("layer")
    t.add_column("location")
    for col in ("environments", "measurements", "decisions"):
        t.add_column(col, justify="right")
    layers = [("yours", db["database"], db["counts"])]
    layers += [("shared (read-only)", s["database"], s["counts"]) for s in db["shared"]]
    for role, where, counts in layers:
        if "error" in counts:
            t.add_row(role, Text(where), Text(f"unusable: {counts['error']}", style="red"), "", "")
        elif "missing" in counts:
            t.add_row(role, Text(where), Text(counts["missing"], style="dim"), "", "")
        else:
            t.add_row(role, Text(where), *(str(counts.get(c, "-")) for c in ("environments", "measurements",
                                                                            "decisions")))
    return t


@main.command()
@device_option("Device to inspect")
@json_option()
def doctor(device: str | None, as_json: bool) -> None:
    """Device, versions, backends available here (and why others are not), databases and their row counts.

    Example: autosdpa doctor --device cpu
    """
    from .. import fastkey, memory
    from ..api import available_backends, unavailable_reasons
    from ..dispatch import dispatcher
    from ..environment import environment

    dev = resolve_device(device)
    fp, info = environment(dev)
    kfp, kinfo = environment(dev, kernels=True)
    why = unavailable_reasons(dev)
    backends = [{"backend": n, "available": n not in why, "why_not": why.get(n, "")}
                for n in available_backends(dev) + list(why)]
    try:
        db = _database_report(read_db(None, note=False))
    except click.ClickException as e:  # doctor reports trouble rather than dying of it
        db = {"database": str(cli_settings().db), "counts": {"error": e.message}, "shared": []}
    hot_path = fastkey.describe(dispatcher.settings.native)
    free = memory.free_bytes(dev)
    if as_json:
        print_json({"device": str(dev), "environment": {"fingerprint": fp, **info},
                    "kernels_environment": {"fingerprint": kfp, **kinfo}, "hot_path": hot_path,
                    "free_memory_bytes": free, "backends": backends, **db})
        return
    print_table(environment_table(fp, kfp, kinfo, hot_path, "unknown" if free is None else memory.fmt_bytes(free)))
    print_table(backends_table(dev, backends))
    print_table(databases_table(db))
