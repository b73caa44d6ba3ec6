"""autosdpa: a drop-in ``scaled_dot_product_attention`` that measures every eligible backend on first
sight, checks each against a reference, remembers the results in SQLite, and routes to the winner."""
import warnings as _warnings


with _warnings.catch_warnings():  # torch's dynamo (imported for CausalBias) warns when numpy is absent
    _warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    from .api import available_backends, explain, patch, tune, unpatch
    from .dispatch import reset, scaled_dot_product_attention, sdpa
    from .overrides import backend, mode
    from .problem import Problem
    from .tuner import Decision

__version__ = "0.1.0"
__all__ = ["scaled_dot_product_attention", "sdpa", "explain", "available_backends", "backend", "mode", "tune",
           "patch", "unpatch", "reset", "Decision", "Problem", "__version__"]
