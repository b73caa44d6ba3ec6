"""PyTorch's own SDPA backends, run through ``F.scaled_dot_product_attention`` with only that one
backend's flag on, so that PyTorch keeps doing every bit of input handling itself."""
from __future__ import annotations

import contextlib
import re
import threading
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from .base import CAUSAL_BOTTOM_RIGHT, Backend, Call, register

_C = torch._C
_sdpa = F.scaled_dot_product_attention

# Flag getters/setters in PyTorch's priority order slots: (flash, efficient, math, cudnn).
_GET = (_C._get_flash_sdp_enabled, _C._get_mem_efficient_sdp_enabled, _C._get_math_sdp_enabled,
        _C._get_cudnn_sdp_enabled)
_SET = (_C._set_sdp_use_flash, _C._set_sdp_use_mem_efficient, _C._set_sdp_use_math, _C._set_sdp_use_cudnn)

#: SDPBackend enum value -> our backend name.
TORCH_NAMES = {int(SDPBackend.MATH): "math", int(SDPBackend.FLASH_ATTENTION): "flash",
               int(SDPBackend.EFFICIENT_ATTENTION): "efficient", int(SDPBackend.CUDNN_ATTENTION): "cudnn"}
_FLAG_SLOT = {"flash": 0, "efficient": 1, "math": 2, "cudnn": 3}

# PyTorch's flags are process-wide: toggles by different threads must not interleave (a lost restore would
# leave the whole process on one backend). Threads calling F.sdpa directly meanwhile can still see them,
# exactly as with PyTorch's own sdpa_kernel.
_FLAG_LOCK = threading.Lock()

_TRIGGERED = re.compile(r"\s*\(Triggered internally at .*\)\s*$", re.S)


def torch_flags() -> tuple[bool, bool, bool, bool]:
    """PyTorch's global SDPA flags: (flash, efficient, math, cudnn)."""
    return tuple(g() for g in _GET)  # type: ignore[return-value]


@contextlib.contextmanager
def only_flags(on: tuple[bool, bool, bool, bool]):
    """Set PyTorch's four SDPA flags, restoring them after (cheaper than ``sdpa_kernel``)."""
    with _FLAG_LOCK:
        prev = tuple(g() for g in _GET)
        for s, v in zip(_SET, on):
            s(v)
        try:
            yield
        finally:
            for s, v in zip(_SET, prev):
                s(v)


def _messages(caught) -> list[str]:
    out = []
    for w in caught:
        msg = _TRIGGERED.sub("", str(w.message)).strip()
        if msg and not msg.endswith("because:"):
            out.append(msg)
    return out


def _as_pytorch_sees_it(call: Call, efficient: bool = False):
    """(mask, is_causal) that PyTorch's checks see for this call. A CausalBias dispatches itself: upper-left is
    is_causal=True; lower-right is efficient attention's own causal variant, else F.sdpa on the
    materialised mask."""
    if call.attn_mask is None or call.dense_mask is not None:
        return call.dense_mask, call.is_causal
    if call.causal != CAUSAL_BOTTOM_RIGHT or efficient:
        return None, True
    return call.attn_mask._materialize(call.query.device), False


def pytorch_choice(call: Call) -> str | None:
    """The backend PyTorch itself would run for this call under the current flags (None if none)."""
    if call.causal == CAUSAL_BOTTOM_RIGHT and torch_flags()[1] and not EFFICIENT.not_supported_reasons(call):
        return "efficient"
    m, is_causal = _as_pytorch_sees_it(call)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            idx = torch._fused_sdp_choice(call.query, call.key, call.value, m, call.dropout_p, is_causal,
                                          scale=call.scale, enable_gqa=call.enable_gqa)
    except RuntimeError:
        return None
    return TORCH_NAMES.get(int(idx))


class TorchBackend(Backend):
    """One of PyTorch's backends; it runs F.sdpa with only its own flag on."""

    def __init__(self, name: str, torch_backend: SDPBackend, cuda_check=None):
        self.name = name  # type: ignore[misc]
        self.torch_backend = torch_backend  # type: ignore[misc]
        self._cuda_check = cuda_check
        on = [False] * 4
        on[_FLAG_SLOT[name]] = True
        self._flags = tuple(on)

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
        return None

    def not_supported_reasons(self, call: Call) -> list[str]:
        device = call.query.device
        why = self.unavailable_reason(device)
        if why:
            return [why]
        if self.name == "math":
            return []
        mask, is_causal = _as_pytorch_sees_it(call, efficient=self.name == "efficient")
        # Ask PyTorch's own checks, with this backend's flag on so the answer is about the inputs.
        with warnings.catch_warnings(record=True) as caught, only_flags(self._flags):
            warnings.simplefilter("always")
            if device.type == "cuda":
                if self._cuda_check is None:
                    return [f"this PyTorch ({torch.__version__}) has no can_use_{self.name}_attention check"]
                params = torch.backends.cuda.SDPAParams(call.query, call.key, call.value, mask,
                                                        call.dropout_p, is_causal, call.enable_gqa)
                ok = self._cuda_check(params, True)
            else:
                try:
                    ok = int(torch._fused_sdp_choice(call.query, call.key, call.value, mask, call.dropout_p,
                                                     is_causal, scale=call.scale,
                                                     enable_gqa=call.enable_gqa)) == int(self.torch_backend)
                except RuntimeError as e:
                    ok = False
                    if not _messages(caught):
                        return [str(e)]
        if ok:
            return []
        return _messages(caught) or [f"PyTorch's checks reject the {self.name} backend for these inputs"]

    def run(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False):
        g, s = _GET, _SET
        on = self._flags
        with _FLAG_LOCK:
            prev = (g[0](), g[1](), g[2](), g[3]())
            s[0](on[0]); s[1](on[1]); s[2](on[2]); s[3](on[3])
            try:
                return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                             enable_gqa=enable_gqa)
            finally:
                s[0](prev[0]); s[1](prev[1]); s[2](prev[2]); s[3](prev[3])

    def workspace_bytes(self, call: Call) -> int:
        if self.name != "math":
            return 0
        q, k = call.query, call.key
        rows = q.numel() // q.shape[-1]
        # scores + softmax (+ their grads when training), in the compute dtype
        return rows * k.shape[-2] * q.element_size() * (4 if call.needs_grad else 2)


MATH = register(TorchBackend("math", SDPBackend.MATH))
FLASH = register(TorchBackend("flash", SDPBackend.FLASH_ATTENTION, torch.backends.cuda.can_use_flash_attention))
EFFICIENT = register(TorchBackend("efficient", SDPBackend.EFFICIENT_ATTENTION,
                                  torch.backends.cuda.can_use_efficient_attention))
CUDNN = register(TorchBackend("cudnn", SDPBackend.CUDNN_ATTENTION,
                              getattr(torch.backends.cuda, "can_use_cudnn_attention", None)))


def get_torch(name: str) -> TorchBackend:
    return {"math": MATH, "flash": FLASH, "efficient": EFFICIENT, "cudnn": CUDNN}[name]
