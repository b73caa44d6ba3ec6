"""Who wins (DESIGN §3), as a pure function of the overrides in force: no tensors, no state.

``resolve(overrides, default_mode, flags, priority_set)`` says whether autosdpa chooses at all, which backends
may be candidates, and whether the choice is forced. Eligibility and measurements come after, elsewhere.
"""
from __future__ import annotations

import dataclasses

#: PyTorch's sdp flags in the order the dispatcher reads them: (flash, efficient, math, cudnn).
FLAG_NAMES = ("flash", "efficient", "math", "cudnn")


@dataclasses.dataclass(frozen=True)
class Overrides:
    """autosdpa's own overrides in force: ``mode(...)`` and ``backend(...)``; None means "not set"."""

    mode: str | None = None
    backends: tuple[str, ...] | None = None


NO_OVERRIDES = Overrides()


@dataclasses.dataclass(frozen=True)
class Policy:
    """What the overrides allow for one call.

    ``passthrough``: call F.sdpa untouched (``reason`` says why). Otherwise autosdpa chooses among
    ``allowed`` (None: every backend that is a default candidate on the device) in ``mode``; ``forced`` means
    the user named the backends, so an ineligible one is an error rather than a fallback, and PyTorch-only
    restrictions (``torch_only``) leave this project's kernels out."""

    passthrough: bool = False
    mode: str = "tune"
    allowed: tuple[str, ...] | None = None
    forced: bool = False
    torch_only: bool = False
    reason: str = ""


def resolve(overrides: Overrides, default_mode: str, flags: tuple[bool, ...], priority_set: bool) -> Policy:
    """The policy for the overrides in force (highest first): mode 'off', ``autosdpa.backend(...)``, a PyTorch
    priority order, PyTorch's sdp flags, else measure everything."""
    mode = overrides.mode or default_mode
    if mode == "off":
        return Policy(passthrough=True, mode=mode, reason="autosdpa mode is 'off'")
    if overrides.backends:
        return Policy(mode=mode, allowed=tuple(overrides.backends), forced=True,
                      reason=f"restricted by autosdpa.backend({', '.join(overrides.backends)})")
    if priority_set:
        return Policy(passthrough=True, mode=mode, reason="a PyTorch priority order is set: PyTorch decides")
    if not all(flags):
        on = tuple(name for name, enabled in zip(FLAG_NAMES, flags) if enabled)
        return Policy(mode=mode, allowed=on, torch_only=True,
                      reason="restricted by PyTorch's sdpa flags (sdpa_kernel / enable_*_sdp)")
    return Policy(mode=mode)
