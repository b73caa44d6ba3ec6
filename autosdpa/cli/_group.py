"""The ``autosdpa`` click group; each command module registers itself on it."""
from __future__ import annotations

import sys
import warnings

import click

from ._common import default_db_path
from ._signals import INTERRUPTED, MESSAGE, exit_on_interrupt


def interrupted() -> None:
    """Ctrl-C once the command runs: one short line on stderr and exit status 130, never a traceback (click
    alone would say "Aborted!" and exit with 1)."""
    sys.stderr.write(MESSAGE)
    sys.stderr.flush()
    raise click.exceptions.Exit(INTERRUPTED)


def load_runtime() -> None:
    """Import torch and the dispatcher, which every command that runs needs (after this its own imports are
    free), with Ctrl-C exiting at once meanwhile (``exit_on_interrupt``)."""
    with exit_on_interrupt(), warnings.catch_warnings():
        # torch warns on import when numpy is absent (numpy is optional for autosdpa): not the user's concern
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
        import autosdpa.api  # noqa: F401  (torch, the dispatcher, the backends)


class Command(click.Command):
    """A command that loads the runtime once its arguments parsed (never for --help or a usage error)."""

    def invoke(self, ctx):
        load_runtime()
        return super().invoke(ctx)


class Group(click.Group):
    """A click group on which Ctrl-C, whenever it comes (parsing, a command's imports, its work), ends the
    command with :func:`interrupted`. Commands that keep partial results (``tune``) catch it first. Its
    commands and subgroups are of these classes too."""

    command_class = Command
    group_class = type  # subgroups (``db``) are Groups like this one

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt:
            interrupted()

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            interrupted()


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True,
                                          "max_content_width": 100},
             help="autosdpa: tune, inspect and share attention backend choices.\n\n"
                  f"Measurements live in the tuning database: {default_db_path()} unless AUTOSDPA_DB (a file path "
                  "or SQLAlchemy URL) or a command's --db names another. `autosdpa help shapes` lists the fields "
                  "of --shape.")
@click.version_option(package_name="autosdpa")
def main() -> None:
    pass
