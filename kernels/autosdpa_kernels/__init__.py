"""autosdpa_kernels: Triton attention kernels for autosdpa (shipped from the repo's ``kernels/`` folder).

* :mod:`autosdpa_kernels.flash`  -- FlashAttention-2 style forward + backward (``attention``, differentiable)
* :mod:`autosdpa_kernels.decode` -- split-KV ("flash-decoding") forward for small Lq and long Lk

Importing this package (or ``flash``/``decode``) never imports triton nor launches anything; the Triton
kernels are imported and compiled on first use.  They run on CUDA, or on the CPU under ``TRITON_INTERPRET=1``
(which must be set before the first kernel launch in the process).
"""
from __future__ import annotations

from . import decode, flash  # noqa: F401  (both are light: no triton import)
from ._common import triton_available  # noqa: F401

__version__ = "0.1.0"
__all__ = ["flash", "decode", "triton_available", "__version__"]
