"""The ``autosdpa`` command line."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="autosdpa")
def main() -> None:
    """autosdpa: tune, inspect and share attention backend choices."""


from . import doctor as _doctor  # noqa: E402,F401  (registers its command)
from . import tune as _tune, show as _show, explain as _explain, bench as _bench, presets as _presets  # noqa: E402,F401,E501
from . import db as _db  # noqa: E402,F401  (registers the `db` group)
