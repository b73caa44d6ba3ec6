"""``autosdpa doctor``: what this machine can run, and where the measurements live."""
from __future__ import annotations

import click
import torch
from rich.console import Console
from rich.table import Table

from . import main


@main.command()
@click.option("--device", default=None, help="Device to inspect (default: cuda if available, else cpu).")
def doctor(device: str | None) -> None:
    """Device, versions, backends available here (and why others are not), database and shared layers.

    Example: autosdpa doctor --device cpu
    """
    from .. import dispatch
    from ..api import available_backends, unavailable_reasons
    from ..environment import environment
    from ..store import StoreError

    console = Console()
    try:
        dev = torch.device(device if device else ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    except RuntimeError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    fp, info = environment(dev)
    t = Table(title="environment", show_header=False)
    for k, v in {"fingerprint": fp, **info}.items():
        t.add_row(k, str(v))
    console.print(t)
    t = Table(title=f"backends on {dev}")
    t.add_column("backend")
    t.add_column("available")
    t.add_column("why not")
    why = unavailable_reasons(dev)
    for name in available_backends(dev) + list(why):
        t.add_row(name, "no" if name in why else "yes", why.get(name, ""))
    console.print(t)
    store = dispatch.get_store()
    try:
        counts = store.counts()
    except Exception as e:  # doctor reports trouble rather than dying of it
        counts = {"error": str(e)}
    console.print(f"database: {store.display_url}  {counts}")
    for layer in store.shared:
        try:
            console.print(f"shared (read-only): {layer.display_url}  {layer.counts()}")
        except StoreError as e:
            console.print(f"shared (read-only): {layer.display_url}  unreadable: {e}")
