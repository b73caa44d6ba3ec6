"""Hugging Face transformers: ``attn_implementation="autosdpa"``.

    import autosdpa.integrations.hf
    autosdpa.integrations.hf.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="autosdpa")

``attention_forward`` follows the semantics of transformers' own ``sdpa_attention_forward``
(``transformers/integrations/sdpa_attention.py``) so that a model gives the same outputs as with ``"sdpa"``, but
the attention itself is ``autosdpa.scaled_dot_product_attention``: tuned and routed to the measured winner.
The name also gets the masks ``"sdpa"`` gets (transformers builds masks per implementation name, and a name it
does not know gets no mask at all, which would silently drop padding).
"""
from __future__ import annotations

import logging
import re

import torch

from .. import scaled_dot_product_attention as _autosdpa
from ..masks import StructuredMask, key_padding

NAME = "autosdpa"
log = logging.getLogger("autosdpa")
_warned_output_attentions = False


def register(name: str = NAME) -> str:
    """Make ``attn_implementation=name`` (default ``"autosdpa"``) available to every transformers model that
    supports ``"sdpa"``. Safe to call more than once. Returns the name."""
    AttentionInterface, ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface = _interfaces()
    # Both are class-wide registries: every model, already built or not, sees the new name.
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_builder)
    return name


def mask_builder(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask: torch.Tensor | None = None, local_size=None, **kwargs):
    """transformers' mask interface for "autosdpa": the mask "sdpa" gets, except that a padded batch of a plain
    causal or bidirectional model gets a ``StructuredMask`` (``autosdpa.masks.key_padding``) standing for the
    same dense mask. autosdpa then runs the padded batch as shorter sequences where that measures faster, and
    never reads a mask's values per layer: the padding's lengths are read here, once per forward (one host sync
    on CUDA). Everything else -- other mask functions, sliding windows, offsets it cannot express, tracing and
    compiling -- gets "sdpa"'s own mask."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    args = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                kv_offset=kv_offset, attention_mask=attention_mask, local_size=local_size, **kwargs)
    if mask_function is not None:
        args["mask_function"] = mask_function
    structured = _structured(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                             local_size, kwargs)
    return structured if structured is not None else ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](**args)


def _structured(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, local_size,
                kwargs):
    from transformers import masking_utils as mu

    causal = mask_function is mu.causal_mask_function or mask_function is None
    if not (causal or mask_function is mu.bidirectional_mask_function) or attention_mask is None:
        return None
    if (local_size is not None or kwargs.get("use_vmap") or torch.compiler.is_compiling()
            or not all(isinstance(x, int) for x in (q_offset, kv_offset)) or attention_mask.dim() != 2):
        return None
    if causal and q_offset - kv_offset >= kv_length - 1:
        causal = False  # every query may see every key (a decode step): padding is all that is left
    elif causal and not (q_length == kv_length and q_offset == kv_offset):
        return None  # a causal offset that key padding objects do not describe
    pad = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
    if pad.shape != (batch_size, kv_length):
        return None
    pad = pad.bool()
    n = pad.sum(-1)
    j = torch.arange(kv_length, device=pad.device)
    right = (pad == (j[None] < n[:, None])).all()
    left = (pad == (j[None] >= kv_length - n[:, None])).all()
    *lengths, right_ok, left_ok = torch.cat([n, right[None], left[None]]).tolist()  # the one read per forward
    if min(lengths) == kv_length or not (right_ok or left_ok):
        return None  # no padding ("sdpa" may skip the mask altogether), or holes: the dense mask
    return key_padding(lengths, q_length, kv_length, causal=causal, side="right" if right_ok else "left",
                       device=kwargs.get("device", attention_mask.device))


_MIN_VERSION = (4, 56)


def _interfaces():
    """transformers' attention and mask registries. Raises ImportError saying what is wrong: transformers
    missing or too old, or (the real error, never a version guess) an installed one that fails to import."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("autosdpa.integrations.hf needs transformers >= 4.56: pip install 'autosdpa[hf]'  "
                          f"(or: pip install 'transformers>=4.56'); importing it failed: {e}") from e
    version = getattr(transformers, "__version__", "0")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError as e:
        if _version_tuple(version) < _MIN_VERSION:
            raise ImportError(f"autosdpa.integrations.hf needs transformers >= 4.56 (AttentionInterface and "
                              f"AttentionMaskInterface); transformers {version} is installed: "
                              "pip install 'transformers>=4.56'") from e
        raise ImportError(f"transformers {version} is installed but its attention interfaces failed to import "
                          f"({type(e).__name__}: {e})") from e
    return AttentionInterface, ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface


def _version_tuple(version: str) -> tuple[int, ...]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m[1]), int(m[2])) if m else (0, 0)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, position_bias: torch.Tensor | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q, k, v are (B, H, L, D); returns ((B, Lq, H, Dv), None).
    Mirrors ``transformers.integrations.sdpa_attention.sdpa_attention_forward`` (as of transformers 5.24)."""
    if kwargs.get("softcap") is not None:
        raise ValueError('attn_implementation="autosdpa" does not support `softcap` (as "sdpa"): use "eager"')
    if kwargs.get("output_attentions", False):
        _warn_no_attention_weights()
    q_len = query.shape[2]
    groups = getattr(module, "num_key_value_groups", 1)
    gqa = False
    structured = isinstance(attention_mask, StructuredMask)
    if structured and (position_bias is not None or groups > 1 and not key.shape[-1] == value.shape[-1] <= 256):
        attention_mask, structured = attention_mask.materialize(query.device), False  # the dense mask's paths
    if groups > 1:
        if (attention_mask is None or structured) and key.shape[-1] == value.shape[-1] <= 256:
            # the fused kernels read shared kv heads themselves, but take no mask with them: a structured
            # mask is rewritten away where that is faster
            gqa = True
        elif q_len == 1 and not torch.compiler.is_compiling():
            # One query token: fold the query heads that share a kv head into query rows of that kv head,
            # so no kv copy is made (the decode step of generation).
            query, attention_mask, position_bias = (_fold_heads(t, groups)
                                                    for t in (query, attention_mask, position_bias))
        else:
            # Otherwise enable_gqa would leave only PyTorch's math kernel: repeat the kv heads instead.
            key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)

    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # A causal flag only for several query rows and no mask (a mask already carries causality). The shape test
    # comes first so that dynamic shapes under torch.compile do not turn the flag into a SymBool.
    is_causal = q_len > 1 and attention_mask is None and is_causal
    if isinstance(is_causal, torch.Tensor):  # torch.jit.trace records shapes as tensors
        is_causal = bool(is_causal.item())

    if is_causal and key.shape[2] > q_len:
        # Prefill into an empty static cache: top-left causal never reads past key q_len, so drop the rest
        # (and the problem becomes square, which more kernels take).
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    if position_bias is not None:
        attention_mask = _bias_as_mask(position_bias, attention_mask, is_causal, q_len, key)
        is_causal = False

    out = _autosdpa(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                    is_causal=is_causal, enable_gqa=gqa)
    # Unfold heads (a no-op unless folded above); the batch comes from the output since masks may broadcast it.
    out = out.reshape(out.shape[0], -1, q_len, value.shape[-1])
    return out.transpose(1, 2).contiguous(), None


def _repeat_kv(t: torch.Tensor, n: int) -> torch.Tensor:
    b, h, s, d = t.shape
    return t.unsqueeze(2).expand(b, h, n, s, d).reshape(b, h * n, s, d)


def _fold_heads(t: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """(B, Hq, 1, X) -> (B, Hq/groups, groups, X); a tensor shared by all heads (dim 1 of size 1) broadcasts
    as it is."""
    if t is None or t.shape[1] == 1:
        return t
    return t.reshape(t.shape[0], t.shape[1] // groups, groups, t.shape[-1])


def _bias_as_mask(bias: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, q_len: int,
                  key: torch.Tensor) -> torch.Tensor:
    """One additive float mask from a learned position bias (T5-style) and the bool/float mask or causality."""
    lowest = torch.finfo(key.dtype).min
    if mask is None and is_causal:
        rows = torch.arange(q_len, device=key.device)
        keep = rows[:, None] >= torch.arange(key.shape[2], device=key.device)[None, :]
        out = torch.where(keep, bias, lowest)
    elif mask is None:
        out = bias
    elif mask.dtype == torch.bool:
        out = torch.where(mask, bias, lowest)
    else:
        out = bias + mask
    return out.contiguous()


def _warn_no_attention_weights() -> None:
    global _warned_output_attentions
    if not _warned_output_attentions:
        _warned_output_attentions = True
        log.warning('attn_implementation="autosdpa" returns no attention weights (output_attentions=True): '
                    'use "eager" to get them')
