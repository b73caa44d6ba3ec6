"""Which of PyTorch's SDPA backends can run a call, asked without changing PyTorch's process-wide sdp flags.

CPU: PyTorch's own check (``_fused_sdp_choice``) reads the flags, so the CPU flash kernel's conditions are
written here in Python, in the order of ``use_flash_attention_cpp`` (``sdp_utils_cpp.cpp``/``.h``, torch 2.13);
``tests/test_torch_backends.py`` checks them against ``_fused_sdp_choice`` on thousands of calls.

CUDA: ``torch.backends.cuda.can_use_{flash,efficient,cudnn}_attention`` start with
``check_runtime_disabled_*``, which reads that backend's global flag, and then check only the inputs and the
device. So they are asked (read-only, ``debug=False``: no warnings) when that backend's flag is on; when it is
off, PyTorch's input checks cannot be reached without writing the flag, and the reason says so
(``FLAG_OFF_PREFIX``). The warnings ``debug=True`` would give are not captured: catching warnings changes the
``warnings`` module's process-wide state.
"""
from __future__ import annotations

import torch

_C = torch._C

#: PyTorch's four SDPA flag getters, in the order (flash, efficient, math, cudnn).
FLAG_GETTERS = (_C._get_flash_sdp_enabled, _C._get_mem_efficient_sdp_enabled, _C._get_math_sdp_enabled,
                _C._get_cudnn_sdp_enabled)
FLAG_SLOT = {"flash": 0, "efficient": 1, "math": 2, "cudnn": 3}

#: Reasons that start with this come from a PyTorch flag being off, not from the inputs. Such a reason can be
#: transient (another thread inside ``sdpa_kernel``), so a caller may choose not to remember it.
FLAG_OFF_PREFIX = "PyTorch's flag for this backend is off"

_CPU_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_cuda = torch.backends.cuda
CUDA_CHECKS = {"flash": _cuda.can_use_flash_attention, "efficient": _cuda.can_use_efficient_attention,
               "cudnn": getattr(_cuda, "can_use_cudnn_attention", None)}


def torch_flags() -> tuple[bool, bool, bool, bool]:
    """PyTorch's global SDPA flags: (flash, efficient, math, cudnn). Read only."""
    return (FLAG_GETTERS[0](), FLAG_GETTERS[1](), FLAG_GETTERS[2](), FLAG_GETTERS[3]())


def flag_on(name: str) -> bool:
    return FLAG_GETTERS[FLAG_SLOT[name]]()


def cpu_flash_reasons(query, key, value, attn_mask, dropout_p: float, enable_gqa: bool,
                      raise_like_pytorch: bool = False) -> list[str]:
    """Why PyTorch 2.13 would not pick its CPU flash kernel for these inputs ([] = it would, flags allowing).
    ``attn_mask`` is what F.sdpa hands its checks: the user's bool/float tensor, the materialised mask of a
    lower-right CausalBias, or None. Like PyTorch, this stops at the first failed condition.
    ``raise_like_pytorch``: raise IndexError where PyTorch's check itself does (a 0-D or 1-D mask)."""
    q, k, v = query, key, value
    if q.is_nested or k.is_nested or v.is_nested:
        return ["Both fused kernels of cpp version currently do not support Nested Tensor inputs."]
    if dropout_p > 0.0:
        return ["Both fused kernels do not support non-zero dropout."]
    qs, ks, vs = q.shape, k.shape, v.shape
    if not (len(qs) == len(ks) == len(vs) == 4):
        return [f"All fused kernels requires query, key and value to be 4 dimensional, but got Query dim: "
                f"{len(qs)}, Key dim: {len(ks)}, Value dim: {len(vs)} instead."]
    why = _batch_and_heads(qs, ks, vs, enable_gqa)
    if why:
        return [why]
    if attn_mask is not None:
        why = _mask_shape(qs, ks, attn_mask, raise_like_pytorch)
        if why:
            return [why]
    if not (qs[3] == ks[3] == vs[3]):
        return [f"Flash attention requires q,k,v to have the same last dimension. Got Query.size(-1): {qs[3]}, "
                f"Key.size(-1): {ks[3]}, Value.size(-1): {vs[3]} instead."]
    if qs[2] == 0 or ks[2] == 0:
        return ["All fused kernels do not support zero seq_len_q or seq_len_kv."]
    if q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        return [f"All fused kernels require the last dimension of the input to have stride 1. Got "
                f"Query.stride(-1): {q.stride(3)}, Key.stride(-1): {k.stride(3)}, Value.stride(-1): {v.stride(3)}"]
    dt = q.dtype
    if not (dt == k.dtype and dt == v.dtype and dt in _CPU_FLASH_DTYPES):
        return [f"Expected query, key and value to all be of dtype: {{float32, float64, bfloat16, float16}}. Got "
                f"Query dtype: {dt}, Key dtype: {k.dtype}, and Value dtype: {v.dtype} instead."]
    return []


def _sizes(qs, ks, vs) -> str:
    return f"Query.sizes(): {list(qs)}, Key.sizes(): {list(ks)}, Value.sizes(): {list(vs)} instead."


def _batch_and_heads(qs, ks, vs, enable_gqa: bool) -> str | None:
    """PyTorch's messages (its debug warnings) for batch and head-count mismatches."""
    if not (qs[0] == ks[0] == vs[0]):
        return ("For dense inputs, both fused kernels require query, key and value to have the same batch_size. "
                + _sizes(qs, ks, vs))
    hq, hk, hv = qs[1], ks[1], vs[1]
    if enable_gqa:
        if hk != hv:
            return ("Both fused kernels require key and value to have the same num_heads and batch_size but got: "
                    + _sizes(qs, ks, vs))
        if hk == 0 or hq % hk:
            return (f"The number of heads in key/value must divide number of heads in query. Got Key heads: {hk}, "
                    f"Value heads: {hv}, Query heads: {hq}.")
        return None
    if not (hq == hk == hv):
        return ("For dense input, both fused kernels require query, key and value to have the same num_heads "
                "(or enable_gqa=True). " + _sizes(qs, ks, vs))
    return None


def _mask_shape(qs, ks, mask, raise_like_pytorch: bool) -> str | None:
    if mask.requires_grad:  # PyTorch gives no message for this one
        return "PyTorch's CPU flash kernel does not compute the gradient of an attn_mask that requires grad."
    if mask.dim() < 2 and raise_like_pytorch:
        # PyTorch's check reads mask.size(-2): F.sdpa raises this whenever the flash flag is on.
        if mask.dim() == 0:
            raise IndexError("Dimension specified as -2 but tensor has no dimensions")
        raise IndexError("Dimension out of range (expected to be in range of [-1, 0], but got -2)")
    want = (qs[0], qs[1], qs[2], ks[2])
    if mask.dim() in (2, 4) and all(m == w or m == 1 for m, w in zip(mask.shape, want[4 - mask.dim():])):
        return None
    return ("Please use the following attn mask shapes: 2d - ({Q_seq_len, 1}  x {KV_seq_len, 1}); 4d - ({Batch, 1} "
            f"x {{Num_heads, 1}} x {{Q_seq_len, 1}}  x {{KV_seq_len, 1}}) (got {list(mask.shape)} for B, H, Lq, Lk "
            f"= {list(want)})")


def cpu_flash_safety_reasons(query, key, value) -> list[str]:
    """Inputs PyTorch's checks let through to its CPU flash kernel that make it read out of bounds (torch 2.13:
    garbage or a crashed process); autosdpa refuses them (its one deliberate difference from F.sdpa)."""
    if key.dim() >= 2 and value.dim() >= 2 and key.shape[-2] != value.shape[-2]:
        return [f"key and value have different sequence lengths ({key.shape[-2]} and {value.shape[-2]}): "
                "PyTorch's CPU flash kernel would read past value, so autosdpa does not run it"]
    return []


def cuda_reasons(name: str, query, key, value, attn_mask, dropout_p: float, is_causal: bool,
                 enable_gqa: bool) -> list[str]:
    """Why PyTorch's CUDA ``name`` backend cannot run these inputs ([] = it can), from PyTorch's own check,
    asked only while that backend's flag is on (it is the check's first condition)."""
    check = CUDA_CHECKS[name]
    if check is None:
        return [f"this PyTorch ({torch.__version__}) has no can_use_{name}_attention check"]
    if not flag_on(name):
        return [f"{FLAG_OFF_PREFIX} (sdpa_kernel / enable_*_sdp): PyTorch's input checks for {name} start by "
                "reading it, and autosdpa never writes it"]
    params = _cuda.SDPAParams(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if check(params, False):
        return []
    return [f"PyTorch's checks reject {name} for these inputs (torch.backends.cuda.can_use_{name}_attention("
            "SDPAParams(...), debug=True) prints why)"]


def cuda_can_use(name: str, query, key, value, attn_mask, dropout_p: float, is_causal: bool,
                 enable_gqa: bool) -> bool:
    """PyTorch's own flag-aware answer (what F.sdpa itself would accept right now); read only."""
    check = CUDA_CHECKS[name]
    if check is None:
        return False
    return bool(check(_cuda.SDPAParams(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa), False))
