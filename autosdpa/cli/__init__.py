"""The ``autosdpa`` command line.

Importing it loads click, rich and the command definitions, not torch: each command loads the runtime when it
runs (``_group.load_runtime``), so ``--help`` and argument errors answer at once. Ctrl-C at any moment ends a
command with one line and exit status 130: while modules load through ``_signals.exit_on_interrupt``, later
through ``_group.interrupted``."""
from __future__ import annotations

from ._signals import exit_on_interrupt

with exit_on_interrupt():
    from ._group import main  # noqa: F401  (the console script's entry point)
    from . import doctor as _doctor  # noqa: F401  (each command module registers its command)
    from . import tune as _tune, show as _show, explain as _explain, bench as _bench  # noqa: F401
    from . import presets as _presets, db as _db, help as _help  # noqa: F401
