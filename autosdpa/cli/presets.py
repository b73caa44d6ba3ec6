"""``autosdpa presets``: the shipped model presets, and what each holds."""
from __future__ import annotations

import click
from rich.table import Table
from rich.text import Text

from ._group import main
from ._common import json_option, out, print_json, print_table, short_key


def print_presets() -> None:
    from ..workload import list_presets

    t = Table(title="presets (autosdpa tune --preset NAME)")
    t.add_column("name", style="bold")
    t.add_column("problems", justify="right")
    t.add_column("description")
    for p in list_presets():
        t.add_row(p["name"], str(p["problems"]), p["description"])
    print_table(t)
    out.print("[dim]`autosdpa presets NAME` lists a preset's problems and cites its source.[/]")


@main.command()
@click.argument("name", required=False)
@json_option()
def presets(name: str | None, as_json: bool) -> None:
    """List the shipped model presets, or the problems of one.

    \b
    Examples:
      autosdpa presets
      autosdpa presets llama3-8b
    """
    from ..workload import WorkloadError, canonical, list_presets, load_preset

    if name is None:
        if as_json:
            print_json(list_presets())
        else:
            print_presets()
        return
    try:
        items = load_preset(name)
    except WorkloadError as e:
        raise click.BadParameter(str(e), param_hint="NAME") from None
    if as_json:
        print_json([{"label": it.label, "problem": it.problem.key, "key": canonical(it.problem).key}
                    for it in items])
        return
    doc = next(p for p in list_presets() if p["name"] == name.strip().lower())
    t = Table(title=f"{doc['name']}: {doc['description']}", caption=f"source: {doc['source']}")
    t.add_column("label")
    t.add_column("problem", overflow="fold")
    for it in items:
        t.add_row(Text(it.label), short_key(it.problem.key))
    print_table(t)
