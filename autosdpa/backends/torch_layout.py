"""The memory layout of each PyTorch backend's output, derived from its inputs (never by running it), and the
copy that gives another backend's output that layout.

F.sdpa's output strides depend on which backend ran: math returns a contiguous tensor; the flash kernels
(CPU and CUDA) allocate ``empty_like(query)`` and so follow the query's memory order (a query viewed from
a (B, L, H, D) buffer gives a (B, L, H, D)-ordered output, which ``y.transpose(1, 2).view(B, L, E)`` relies
on) and, for a dense query, its very strides (dims of size 1 included); CUDA efficient attention always
returns (B, L, H, D) order; cuDNN follows the query like the meta function ``alloc_with_matching_layout``.
A drop-in must hand back exactly what PyTorch's own pick would: ``restride(out, output_strides(call, pick))``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Call


def dense_order(sizes, strides) -> tuple[int, ...]:
    """Dim order (outermost first) of the dense tensor ``empty_like`` allocates for a tensor with these sizes
    and strides: PyTorch's stride sort (``infer_dense_strides``), an insertion sort from the innermost dim in
    which a dim with stride 0 never moves and, of equal strides, the larger size goes outside."""
    n = len(sizes)
    perm = list(range(n - 1, -1, -1))  # innermost first

    def compare(a: int, b: int) -> int:  # > 0: a must go outside b
        sa, sb = strides[a], strides[b]
        if sa == 0 or sb == 0:
            return 0
        if sa != sb:
            return -1 if sa < sb else 1
        return 1 if sizes[a] > sizes[b] else 0

    for i in range(1, n):
        moving = i
        for inner in range(i - 1, -1, -1):
            c = compare(perm[inner], perm[moving])
            if c > 0:
                perm[inner], perm[moving] = perm[moving], perm[inner]
                moving = inner
            elif c < 0:
                break
    return tuple(reversed(perm))


def output_order(call: Call, backend_name: str) -> tuple[int, ...]:
    """The dim order (outermost to innermost) of the output PyTorch's ``backend_name`` returns for ``call``."""
    q = call.query
    n = q.dim()
    identity = tuple(range(n))
    if backend_name not in ("math", "flash", "efficient", "cudnn"):
        raise ValueError(f"output_order knows PyTorch's backends only, not {backend_name!r}")
    if backend_name == "math" or n != 4 or q.is_nested:
        return identity  # math: matmul's contiguous result; the fused kernels take 4-D inputs only
    if q.device.type != "cuda":
        return dense_order(q.shape, q.stride()) if backend_name == "flash" else identity
    if backend_name == "efficient":
        return (0, 2, 1, 3)  # allocated as (B, Lq, H, Dv), returned transposed
    if backend_name == "flash":
        if q.shape[-1] % 8:
            return identity  # F.sdpa pads the head dim: the kernel sees a fresh contiguous copy
        qt = q.transpose(1, 2)  # the kernel allocates empty_like of the (B, L, H, D) view, then transposes back
        swap = (0, 2, 1, 3)
        return tuple(swap[d] for d in dense_order(qt.shape, qt.stride()))
    return _cudnn_order(q, call.value)


def output_strides(call: Call, backend_name: str) -> tuple[int, ...]:
    """The exact strides of the output PyTorch's ``backend_name`` returns for ``call`` (4-D and 3-D calls; the
    output has q's shape with v's head dim)."""
    q = call.query
    shape = (*q.shape[:-1], call.value.shape[-1])
    if _empty_like_query(call, backend_name) and has_order(q, dense_order(q.shape, q.stride())):
        return tuple(q.stride())  # empty_like keeps a dense tensor's strides, even those of size-1 dims
    return order_strides(shape, output_order(call, backend_name))


def _empty_like_query(call: Call, backend_name: str) -> bool:
    """Whether the backend allocates its output as ``empty_like`` of the query itself."""
    q = call.query
    if backend_name != "flash" or q.dim() != 4 or q.is_nested or call.value.shape[-1] != q.shape[-1]:
        return False
    return q.device.type == "cpu"


def order_strides(sizes, order: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a dense tensor laid out in ``order`` (outermost first), as PyTorch computes them: a dim
    of size 1 gets the product of the sizes inside it."""
    strides = [0] * len(sizes)
    inner = 1
    for d in reversed(order):
        strides[d] = inner
        inner *= sizes[d]
    return tuple(strides)


def _cudnn_order(q: Tensor, v: Tensor) -> tuple[int, ...]:
    if v.shape[-1] == q.shape[-1]:
        return dense_order(q.shape, q.stride())  # empty_like(query)
    strides = q.stride()
    return tuple(sorted(range(4), key=lambda d: strides[d], reverse=True))  # stable: ties keep dim order


def has_order(t: Tensor, order: tuple[int, ...]) -> bool:
    """Whether ``t`` is dense with its dims laid out in ``order`` (dims of size 1 can have any stride)."""
    expected = 1
    sizes, strides = t.shape, t.stride()
    for d in reversed(order):
        if sizes[d] != 1:
            if strides[d] != expected:
                return False
            expected *= sizes[d]
    return True


def restride(out: Tensor, strides: tuple[int, ...]) -> Tensor:
    """``out`` itself when it has exactly these strides; a view when it differs only on dims of size 1 (which
    address no other memory); else a copy with these strides. Same values, differentiable."""
    if out.numel() == 0 or out.stride() == strides:
        return out
    if all(a == b for n, a, b in zip(out.shape, out.stride(), strides) if n != 1):
        return out.as_strided(out.shape, strides)
    return torch.empty_strided(out.shape, strides, dtype=out.dtype, device=out.device).copy_(out)


def strides_match(a: Tensor, b: Tensor) -> bool:
    """Same shape and the same strides on every dim of size > 1 (what views and ``is_contiguous`` see)."""
    if a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n != 1)


__all__ = ["dense_order", "has_order", "order_strides", "output_order", "output_strides", "restride",
           "strides_match"]
