"""autosdpa: a drop-in ``scaled_dot_product_attention`` that measures every eligible backend on first
sight, checks each against a reference, remembers the results in SQLite, and routes to the winner."""
from .config import configure_logging as _configure_logging

_configure_logging()

from .api import available_backends, explain, patch, tune, unpatch  # noqa: E402
from .dispatch import reset, scaled_dot_product_attention, sdpa  # noqa: E402
from .overrides import backend, mode  # noqa: E402
from .problem import Problem  # noqa: E402
from .tuner import Decision  # noqa: E402

__version__ = "0.1.0"
__all__ = ["scaled_dot_product_attention", "sdpa", "explain", "available_backends", "backend", "mode", "tune",
           "patch", "unpatch", "reset", "Decision", "Problem", "__version__"]
