"""Which backends can run one concrete call, and why the others cannot (every backend says why not)."""
from __future__ import annotations

import torch

from . import backends as _backends
from .backends.base import Backend, Call


class ForcedBackendError(RuntimeError):
    """``autosdpa.backend(...)`` named backends none of which can run these inputs."""

    @classmethod
    def for_names(cls, names, reasons: dict[str, str]) -> "ForcedBackendError":
        return cls("autosdpa.backend(" + ", ".join(map(repr, names)) + ") cannot run these inputs: "
                   + "; ".join(f"{n}: {reasons.get(n) or 'not eligible'}" for n in names))


def eligibility(call: Call, backends: list[Backend] | None = None) -> dict[str, list[str]]:
    """{backend: reasons it cannot run this call}; an empty list means eligible."""
    out = {}
    m = call.dense_mask
    mask_grad = m is not None and m.requires_grad and torch.is_grad_enabled()
    for b in backends if backends is not None else _backends.all_backends():
        try:
            reasons = form_reasons(call, b) or list(b.not_supported_reasons(call))
        except Exception as e:  # a broken check only rules its backend out
            reasons = [f"eligibility check failed: {type(e).__name__}: {e}"]
        if not reasons:
            if call.needs_grad and not b.supports_grad:
                reasons = ["forward only: cannot compute gradients"]
            elif mask_grad and b.torch_backend is None:
                reasons = ["attn_mask requires grad: only PyTorch's backends compute the mask's gradient"]
        out[b.name] = reasons
    return out


def form_reasons(call: Call, backend: Backend) -> list[str]:
    """Why ``backend`` cannot take this call because of what the call is (``Call.form``): PyTorch's math backend,
    say, would run a NestedTensor call its own way, which is not what it was measured on. The dispatcher never
    lists such backends for a call; a forced one says why here."""
    form = call.form
    if form in backend.forms:
        return []
    if form == "jagged":
        return ["takes no NestedTensor (jagged) inputs; the njt_* backends run them"]
    if "jagged" in backend.forms:
        return ["takes only NestedTensor (jagged layout) inputs"]
    return ["takes only masks with a structure it rewrites; this mask has none"]


def reasons_text(elig: dict[str, list[str]]) -> dict[str, str]:
    return {n: "; ".join(r) for n, r in elig.items() if r}
