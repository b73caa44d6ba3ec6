"""Backend registry: PyTorch's own backends, this project's Triton kernels, and the NestedTensor backends."""
from .base import Backend, Call, all_backends, get, register, unregister  # noqa: F401
from . import torch_backends  # noqa: F401  (registers math, flash, efficient, cudnn)

try:  # our Triton kernels; the module itself imports triton lazily
    from . import triton as _triton  # noqa: F401
except ImportError:  # pragma: no cover - the kernels package is optional at runtime
    pass

from . import njt  # noqa: F401,E402  (registers njt_pytorch, njt_padded, njt_split: NestedTensor calls only)

__all__ = ["Backend", "Call", "all_backends", "get", "register", "unregister"]
