"""``autosdpa doctor``: what this machine can run, and where the measurements live."""
from __future__ import annotations

from rich.table import Table
from rich.text import Text

from ._group import main
from ._common import cli_settings, current_store, device_option, json_option, print_json, print_table, resolve_device

#: environment fields as the table names them, in this order (others follow under their own names)
_FIELD_NAMES = {"device_type": "device type", "device_name": "device", "capability": "capability",
                "cores": "cores / SMs", "memory_gb": "device memory (GB)", "torch": "torch", "cuda": "CUDA",
                "cudnn": "cuDNN", "triton": "Triton", "kernels": "autosdpa kernels (source hash)"}


def _database_report(settings) -> dict:
    """Row counts of the user's database and of each shared layer. Read-only: a database file that does not
    exist yet is reported as such, not created (the first tuning creates it)."""
    from ..store import Store, StoreError, parse_target

    def counts(s):
        try:
            return s.counts()
        except StoreError as e:  # doctor reports trouble rather than dying of it
            return {"error": str(e)}
    try:
        kind, where = parse_target(settings.db)
    except StoreError as e:
        return {"database": str(settings.db), "counts": {"error": str(e)}, "shared": []}
    if kind == "file" and not where.exists():
        shared = []
        for p in settings.all_shared_dbs():
            try:
                layer = Store(p, readonly=True, timeout_s=settings.db_timeout_s)
            except StoreError as e:
                shared.append({"database": str(p), "counts": {"error": str(e)}})
                continue
            shared.append({"database": layer.display_url, "counts": counts(layer)})
            layer.close()
        return {"database": str(where), "counts": {"missing": "not created yet: the first tuning creates it"},
                "shared": shared}
    store = current_store()
    return {"database": store.display_url, "counts": counts(store),
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
    db = _database_report(cli_settings())
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
