"""The backend contract and the open registry.

Every backend answers *why not* (a list of human reasons, empty when eligible) for one concrete
call, and runs that call with ``F.scaled_dot_product_attention``'s exact argument list.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import torch
from torch import Tensor
from torch.nn.attention.bias import CausalBias, CausalVariant

# PyTorch's names for the causal variants: is_causal=True is top-left (upper-left) aligned.
CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT = "none", "top_left", "bottom_right"
# The mask structures autosdpa recognises (``forms.structure``); the padded ones carry a length per sequence.
STRUCTURES = ("all", "causal", "causal_br", "kpad_r", "kpad_l", "cpad_r", "cpad_l")
PADDED = ("kpad_r", "kpad_l", "cpad_r", "cpad_l")


@dataclasses.dataclass(frozen=True)
class Call:
    """One concrete attention call, exactly as ``F.scaled_dot_product_attention`` received it."""

    query: Tensor
    key: Tensor
    value: Tensor
    attn_mask: Tensor | None = None  # bool / float tensor, or a CausalBias
    dropout_p: float = 0.0
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False
    needs_grad: bool = False
    structure: object = None  # the mask's structure (forms.structure.Structure) where one is known

    @property
    def causal(self) -> str:
        """Causal alignment implied by ``is_causal`` or a ``CausalBias`` mask."""
        m = self.attn_mask
        if isinstance(m, CausalBias):
            if m.variant == CausalVariant.LOWER_RIGHT and m.seq_len_q != m.seq_len_kv:
                return CAUSAL_BOTTOM_RIGHT
            return CAUSAL_TOP_LEFT
        return CAUSAL_TOP_LEFT if self.is_causal else CAUSAL_NONE

    @property
    def form(self) -> str:
        """What the call is, for the backends that take it (``Backend.forms``): "jagged" (NestedTensor
        inputs), "structured" (a mask with a known structure), or "dense"."""
        if self.query.is_nested:
            return "jagged"
        return "dense" if self.structure is None else "structured"

    @property
    def dense_mask(self) -> Tensor | None:
        """The mask as a plain tensor (None for no mask or a CausalBias, which ``causal`` describes)."""
        m = self.attn_mask
        return None if m is None or isinstance(m, CausalBias) else m

    def args(self) -> tuple:
        return (self.query, self.key, self.value, self.attn_mask, self.dropout_p, self.is_causal,
                self.scale, self.enable_gqa)


class Backend:
    """Base class: subclasses set ``name`` and implement ``not_supported_reasons`` and ``run``."""

    name: ClassVar[str] = ""
    #: PyTorch's SDPBackend for PyTorch's own backends (they obey the sdp flags); None for ours.
    torch_backend: ClassVar[object | None] = None
    #: Whether it can compute gradients (forward + backward).
    supports_grad: ClassVar[bool] = True
    #: Whether its timings depend on Triton and this project's kernels (its rows are then filed under the
    #: environment that fingerprints them); False for anything made of PyTorch's ops only.
    uses_kernels: ClassVar[bool] = True
    #: The call forms (``Call.form``) it takes: a backend is a candidate only for those, and is not listed
    #: (not even as rejected) for the others.
    forms: ClassVar[frozenset[str]] = frozenset({"dense", "structured"})

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why this backend can never run on ``device`` (None when it can run there at all)."""
        return None

    def candidate_by_default(self, device: torch.device) -> bool:
        """Whether the dispatcher times it unasked on ``device``. False e.g. for Triton kernels on CPU, which
        run only under the (slow, test-only) interpreter and are used there only when forced."""
        return True

    def not_supported_reasons(self, call: Call) -> list[str]:
        raise NotImplementedError

    def run(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False) -> Tensor:
        raise NotImplementedError

    def runner(self, call: Call) -> Callable[..., Tensor]:
        """A function with ``run``'s arguments that computes what ``run`` does for inputs of exactly this call's
        shapes, strides, dtypes and devices (a plan asks once per layout). A backend may skip there the
        checks that passed for ``call``; by default it is ``run`` itself."""
        return self.run

    def workspace_bytes(self, call: Call) -> int:
        """Rough extra memory one call needs beyond its inputs and output (for the tuning budget)."""
        return 0

    def __repr__(self) -> str:
        return f"<backend {self.name}>"


def safe_runner(backend: Backend, call: Call) -> Callable[..., Tensor]:
    """``backend.runner(call)``, or ``backend.run`` when setting a runner up fails: the checked path then raises
    what it raises, where the caller can judge it."""
    try:
        return backend.runner(call)
    except Exception:  # noqa: BLE001
        return backend.run


_REGISTRY: dict[str, Backend] = {}
_listeners: list[Callable[[], None]] = []


def register(backend: Backend) -> Backend:
    """Add (or replace) a backend; cached routing decisions are dropped so it becomes a candidate."""
    if not backend.name:
        raise ValueError("a backend needs a name")
    _REGISTRY[backend.name] = backend
    for fn in _listeners:
        fn()
    return backend


def unregister(name: str) -> None:
    if _REGISTRY.pop(name, None) is not None:
        for fn in _listeners:
            fn()


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown autosdpa backend {name!r}; known: {', '.join(_REGISTRY)}") from None


def all_backends() -> list[Backend]:
    return list(_REGISTRY.values())


def on_change(fn: Callable[[], None]) -> None:
    _listeners.append(fn)
