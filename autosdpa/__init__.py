"""autosdpa: a drop-in ``scaled_dot_product_attention`` that measures every eligible backend on first
sight, checks each against a reference, remembers the results in SQLite, and routes to the winner.

The public names are loaded on first use (PEP 562): ``import autosdpa.cli`` (the ``autosdpa`` command) must
not pay for torch and dynamo before it knows it needs them (``autosdpa --help`` took 3 s)."""
from __future__ import annotations

import importlib
import warnings as _warnings

__version__ = "0.1.0"

#: public name -> the module that defines it
_PUBLIC = {
    "available_backends": "api", "explain": "api", "patch": "api", "tune": "api", "unpatch": "api",
    "reset": "dispatch", "scaled_dot_product_attention": "dispatch", "sdpa": "dispatch",
    "backend": "overrides", "mode": "overrides", "Problem": "problem", "Decision": "tuner",
}
__all__ = ["scaled_dot_product_attention", "sdpa", "explain", "available_backends", "backend", "mode", "tune",
           "patch", "unpatch", "reset", "Decision", "Problem", "__version__"]


def _import(module: str):
    with _warnings.catch_warnings():  # torch warns on import when numpy is absent (numpy is optional here)
        _warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
        return importlib.import_module(f".{module}", __name__)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(_import(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("__"):
        try:  # ``autosdpa.dispatch`` after a bare ``import autosdpa``, as before the names became lazy
            return _import(name)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
