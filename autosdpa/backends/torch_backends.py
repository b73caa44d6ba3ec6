"""PyTorch's own SDPA backends (math, flash, efficient, cudnn) as autosdpa backends.

Each runs its ATen op directly, after the preprocessing F.sdpa does for that backend (``torch_ops``), and
answers *why not* without touching PyTorch's process-wide sdp flags (``torch_checks``). Nothing here writes
a flag: toggling them would race other threads' ``sdpa_kernel`` and change what their plain F.sdpa runs.
"""
from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend
from torch.nn.attention.bias import CausalBias

from .. import memory
from . import torch_ops
from .base import Backend, Call, register
from .torch_checks import (FLAG_GETTERS, FLAG_OFF_PREFIX, cpu_flash_reasons, cuda_can_use,  # noqa: F401
                           cuda_reasons, torch_flags)
from .torch_ops import is_lower_right, lower_right_mask

#: Until dispatch.py imports FLAG_GETTERS (the old private name it uses today).
_GET = FLAG_GETTERS

#: SDPBackend enum value -> our backend name.
TORCH_NAMES = {int(SDPBackend.MATH): "math", int(SDPBackend.FLASH_ATTENTION): "flash",
               int(SDPBackend.EFFICIENT_ATTENTION): "efficient", int(SDPBackend.CUDNN_ATTENTION): "cudnn"}


def pytorch_choice(call: Call) -> str | None:
    """The backend F.sdpa would run for this call under PyTorch's current flags (and priority order).
    None when it would run none of them: it raises for these inputs, or returns its empty-input result;
    route such calls to F.sdpa itself. Reads the flags, never writes them."""
    q, k, v, p, gqa = call.query, call.key, call.value, call.dropout_p, call.enable_gqa
    try:
        mask, causal = call.attn_mask, call.is_causal
        if isinstance(mask, CausalBias):
            if causal:
                return None  # CausalBias._dispatch raises ValueError
            if is_lower_right(mask):
                torch_ops.validate_python(q, k, v)
                if q.is_cuda and cuda_can_use("flash", q, k, v, None, p, False, gqa):
                    return "flash"
                if q.is_cuda and cuda_can_use("efficient", q, k, v, None, p, False, gqa):
                    return "efficient"
                mask = lower_right_mask(mask, q.device)
            else:
                mask, causal = None, True
        torch_ops.validate(q, k, v, mask)
        if torch_ops.empty_call(q, k, v):
            return None
        return _fused_choice(q, k, v, mask, p, causal, call.scale, gqa)
    except Exception:  # PyTorch's own checks raise for these inputs (e.g. IndexError for a 1-D mask)
        return None


def _fused_choice(q, k, v, mask, p, causal, scale, gqa) -> str | None:
    flags = torch_flags()
    if not flags[2]:
        # With math off, PyTorch's chooser warns and raises when nothing fits: find that out quietly first.
        if q.device.type == "cpu":
            return "flash" if flags[0] and not cpu_flash_reasons(q, k, v, mask, p, gqa) else None
        if not any(cuda_can_use(n, q, k, v, mask, p, causal, gqa) for n in ("flash", "efficient", "cudnn")):
            return None
    idx = torch._fused_sdp_choice(q, k, v, mask, p, causal, scale=scale, enable_gqa=gqa)
    return TORCH_NAMES.get(int(idx))


class TorchBackend(Backend):
    """One of PyTorch's backends, run through its own ATen op."""

    uses_kernels = False

    def __init__(self, name: str, torch_backend: SDPBackend):
        self.name = name  # type: ignore[misc]
        self.torch_backend = torch_backend  # type: ignore[misc]

    def unavailable_reason(self, device: torch.device) -> str | None:
        dev = torch.device(device)
        if self.name == "math":
            return None
        if dev.type == "cpu":
            return None if self.name == "flash" else f"PyTorch has no CPU {self.name} attention kernel"
        if dev.type != "cuda":
            return f"autosdpa only routes PyTorch's {self.name} backend on CUDA and CPU"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if self.name == "flash" and not torch.backends.cuda.is_flash_attention_available():
            return "this PyTorch build has no flash attention kernel"
        return None

    def not_supported_reasons(self, call: Call) -> list[str]:
        q, k, v = call.query, call.key, call.value
        why = self.unavailable_reason(q.device)
        if why:
            return [why]
        mask, causal = self._as_checked(call)
        if self.name == "math":
            # PyTorch's math op raises for both; F.sdpa's own pick (CPU flash) may take them and return
            return ["attn_mask together with is_causal=True: PyTorch's math op raises"] if (
                mask is not None and causal) else []
        if q.device.type == "cpu":
            # Invalid inputs are not an eligibility matter (run() raises for them, like PyTorch's math; for
            # the k/v length mismatch PyTorch's CPU flash kernel misses, autosdpa's run raises too).
            return cpu_flash_reasons(q, k, v, mask, call.dropout_p, call.enable_gqa)
        return cuda_reasons(self.name, q, k, v, mask, call.dropout_p, causal, call.enable_gqa)

    def _as_checked(self, call: Call):
        """(mask, is_causal) that PyTorch's checks for this backend see. A CausalBias dispatches itself:
        upper-left is is_causal=True; lower-right is CUDA flash's and efficient attention's own causal
        variant (checked without a mask), and a materialised bool mask for every other backend."""
        m = call.attn_mask
        if not isinstance(m, CausalBias):
            return m, call.is_causal
        if not is_lower_right(m):
            return None, True
        if call.query.is_cuda and self.name in ("flash", "efficient"):
            return None, call.is_causal
        return lower_right_mask(m, call.query.device), False

    def run(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False):
        return torch_ops.run(self.name, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    def runner(self, call: Call):
        # past the checks: ~2.5 us less per call (CPU); still ``run`` where it raises or takes its own path
        return torch_ops.runner_for(self.name, *call.args()) or self.run

    def workspace_bytes(self, call: Call) -> int:
        """Memory one call needs beyond its inputs, output and gradients (upper bounds fitted to peak RSS on a
        CPU, torch 2.13)."""
        q, k, v = call.query, call.key, call.value
        rows = (q.values() if q.is_nested else q).numel() // max(1, q.shape[-1])
        if self.name != "math":
            # fused kernels: a float32 logsumexp per query row and, with the backward pass, float32
            # accumulators of the gradients; plus per-thread tiles
            grads = sum(memory.tensor_bytes(t) // t.element_size() for t in (q, k, v)) if call.needs_grad else 0
            return 4 * (2 * rows + grads) + (16 << 20)
        # PyTorch's math op: the score matrix and its softmax in float32 for fp16/bf16 (it upcasts), ~2.5 of
        # them forward and ~3.5 with the backward pass; a causal or bool mask as a float matrix; GQA's k, v
        # repeated to every query head
        size = memory.compute_size(q.dtype)
        need = memory.score_elems(q, k) * size * (4 if call.needs_grad else 3)
        mask = call.dense_mask
        if mask is not None and mask.dtype == torch.bool:
            need += mask.numel() * size
        elif call.causal != "none":
            need += memory.max_len(q) * memory.max_len(k) * (1 + size)
        if call.enable_gqa and not q.is_nested and q.dim() >= 3 and q.shape[-3] != k.shape[-3]:
            need += (memory.tensor_bytes(k) + memory.tensor_bytes(v)) * q.shape[-3] // max(1, k.shape[-3])
        return need


MATH = register(TorchBackend("math", SDPBackend.MATH))
FLASH = register(TorchBackend("flash", SDPBackend.FLASH_ATTENTION))
EFFICIENT = register(TorchBackend("efficient", SDPBackend.EFFICIENT_ATTENTION))
CUDNN = register(TorchBackend("cudnn", SDPBackend.CUDNN_ATTENTION))


def get_torch(name: str) -> TorchBackend:
    return {"math": MATH, "flash": FLASH, "efficient": EFFICIENT, "cudnn": CUDNN}[name]
