"""``autosdpa doctor``: what this machine can run, and where the measurements live."""
from __future__ import annotations

import click
from rich.table import Table

from ._group import main
from ._common import db_name, out, print_json, read_db, resolve_device


def _database_report(store) -> dict:
    from ..store import StoreError

    def counts(s):
        try:
            return s.counts()
        except StoreError as e:  # doctor reports trouble rather than dying of it
            return {"error": str(e)}
    return {"database": db_name(store), "counts": counts(store), **({"note": store.stands_in_for[1]}
                                                                    if store.stands_in_for else {}),
            "shared": [{"database": s.display_url, "counts": counts(s)} for s in store.shared]}


@main.command()
@click.option("--device", default=None, help="Device to inspect: cpu, cuda or cuda:N (default: cuda if "
              "available, else cpu).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
def doctor(device: str | None, as_json: bool) -> None:
    """Device, versions, backends available here (and why others are not), database and shared layers.

    Example: autosdpa doctor --device cpu
    """
    from .. import fastkey
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
        db = _database_report(read_db(None, note=False))  # only reads: not created; its line says so
    except click.ClickException as e:  # doctor reports trouble rather than dying of it
        db = {"database": None, "counts": {"error": e.message}, "shared": []}
    hot_path = fastkey.describe(dispatcher.settings.native)
    if as_json:
        print_json({"device": str(dev), "environment": {"fingerprint": fp, **info},
                    "kernels_environment": {"fingerprint": kfp, **kinfo}, "hot_path": hot_path, "backends": backends,
                    **db})
        return
    t = Table(title="environment", show_header=False)
    for k, v in {"fingerprint (PyTorch's backends)": fp, "fingerprint (autosdpa's kernels)": kfp, **kinfo,
                 "hot path": hot_path}.items():
        t.add_row(k, str(v))
    out.print(t)
    t = Table(title=f"backends on {dev}")
    t.add_column("backend")
    t.add_column("available")
    t.add_column("why not")
    for b in backends:
        t.add_row(b["backend"], "yes" if b["available"] else "no", b["why_not"])
    out.print(t)
    out.print(f"database: {db['database'] or 'unusable'}  "
              + (f"({db['note']})" if "note" in db else str(db["counts"])), markup=False)
    for layer in db["shared"]:
        out.print(f"shared (read-only): {layer['database']}  {layer['counts']}", markup=False)
