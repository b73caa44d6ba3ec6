"""The ``autosdpa`` command line."""
from __future__ import annotations

from ._group import main  # noqa: F401  (the console script's entry point)
from . import doctor as _doctor  # noqa: F401  (registers its command)
from . import tune as _tune, show as _show, explain as _explain, bench as _bench, presets as _presets  # noqa: F401,E501
from . import db as _db  # noqa: F401  (registers the `db` group)
