"""``autosdpa help [TOPIC]``: longer help than an option's line, e.g. the fields of ``--shape``."""
from __future__ import annotations

import click

from ._group import main
from ._common import shapes_help

TOPICS = {"shapes": shapes_help}


@main.command("help")
@click.argument("topic", required=False, type=click.Choice(sorted(TOPICS)))
@click.pass_context
def help_cmd(ctx: click.Context, topic: str | None) -> None:
    """Help on a topic; without one, the list of commands (same as `autosdpa --help`).

    \b
    Example:
      autosdpa help shapes    # every --shape field, its meaning and default
    """
    if topic is None:
        click.echo(ctx.parent.get_help())
        return
    click.echo(TOPICS[topic]())
