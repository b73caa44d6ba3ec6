"""What autocast hands F.sdpa: its policy for scaled_dot_product_attention is "lower precision", which casts
every floating tensor argument on the autocast device to the autocast dtype, except float64 ones."""
from __future__ import annotations

import torch
from torch.nn.attention.bias import CausalBias


def autocast_inputs(device_type: str, *tensors):
    """``tensors`` (None and non-tensors pass through) as autocast would cast them for F.sdpa."""
    dt = torch.get_autocast_dtype(device_type)
    return tuple(_cast(t, device_type, dt) for t in tensors)


def _cast(t, device_type: str, dt: torch.dtype):
    if (isinstance(t, torch.Tensor) and type(t) is not CausalBias and t.is_floating_point()
            and t.dtype is not torch.float64 and t.device.type == device_type):
        return t.to(dt)
    return t
