"""torch.compile follows the tuned decision: inside a compiled graph, autosdpa is the custom op ``autosdpa::sdpa``.

Why a custom op that dispatches at run time, rather than a decision taken while tracing: the op is opaque to
the compiler, so one graph serves every sequence length (``dynamic=True`` adds no recompiles and no guards of
ours), the choice uses the real shapes of each call (the same plan cache as eager code), and tuning never
happens while tracing. Under Inductor's CUDA graphs (``mode="reduce-overhead"``) the warm-up runs are eager, so
a new problem is tuned there; during capture the dispatcher only looks up, and a Triton winner that is not yet
compiled falls back to PyTorch's pick.

The fake (meta) implementation is F.sdpa's own, so shapes and strides are what PyTorch's pick gives, which is
what the dispatcher returns too. Gradients: the backward op recomputes the forward through the dispatcher with
grad enabled (the training-tuned winner) and differentiates it: correct for every backend, at the price of one
extra forward in the backward pass. Calls the op cannot express go to plain F.sdpa in the graph: dropout (its
random stream would have to be replayed), a CausalBias or a mask that needs its own gradient, forward-mode AD
and torch.func transforms (the op defines a backward only), and everything when ``AUTOSDPA_COMPILE=pytorch``
(the opt-out). Under autocast the traced call casts the inputs as F.sdpa's autocast rule does before the op
(``autocast``), so a compiled model computes in the same dtype as with F.sdpa.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.autograd.forward_ad as _fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import CausalBias

_sdpa = F.scaled_dot_product_attention


_eager = _sdpa  # what the op runs: the eager dispatcher, handed over by ``dispatch`` (``use``)


def use(eager) -> None:
    """Make the op run ``eager`` (the dispatcher registers itself: this module imports no dispatcher)."""
    global _eager
    _eager = eager


def _run(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return _eager(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)


@torch.library.custom_op("autosdpa::sdpa", mutates_args=())
def sdpa_op(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool,
            scale: Optional[float], enable_gqa: bool) -> Tensor:
    return _run(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)


@sdpa_op.register_fake
def _sdpa_fake(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return _sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


@contextlib.contextmanager
def _autograd_on():
    """Grad mode on with autograd's dispatch keys back in force: a custom op runs below autograd, and its
    backward recomputes the forward with autograd."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in ("AutogradFunctionality", "AutogradCPU", "AutogradCUDA", "AutogradOther"):
        if hasattr(torch._C.DispatchKey, key):
            exclude = exclude.remove(getattr(torch._C.DispatchKey, key))
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


@torch.library.custom_op("autosdpa::sdpa_backward", mutates_args=())
def sdpa_backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                     dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool
                     ) -> tuple[Tensor, Tensor, Tensor]:
    with _autograd_on():
        xs = tuple(t.detach().requires_grad_() for t in (q, k, v))
        out = _run(*xs, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        dq, dk, dv = torch.autograd.grad(out, xs, grad)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@sdpa_backward_op.register_fake
def _sdpa_backward_fake(grad, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa = inputs
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.args = (dropout_p, is_causal, scale, enable_gqa)


def _backward(ctx, grad):
    q, k, v, attn_mask = ctx.saved_tensors
    dq, dk, dv = sdpa_backward_op(grad, q, k, v, attn_mask, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


sdpa_op.register_autograd(_backward, setup_context=_setup_context)


def expressible(query, attn_mask, dropout_p, is_causal, enable_gqa) -> bool:
    """Whether the custom op can stand for this call in a graph (else the graph calls plain F.sdpa). Not
    under forward-mode AD or a torch.func transform: the op defines a backward only (a tangent would be
    silently lost, and functorch cannot lift its autograd rule)."""
    return (dropout_p == 0.0 and not isinstance(attn_mask, CausalBias) and not query.is_nested
            and not (attn_mask is not None and attn_mask.requires_grad)
            and isinstance(is_causal, bool) and isinstance(enable_gqa, bool)
            and not _forward_ad() and not _functorch_active())


def _forward_ad() -> bool:
    return getattr(_fwAD, "_current_level", -1) >= 0


def _functorch_active() -> bool:
    return torch._C._are_functorch_transforms_active()
