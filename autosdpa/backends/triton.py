"""This project's Triton kernels as autosdpa backends: ``triton_flash`` and ``triton_decode``.

Importing this module is cheap: it imports neither triton nor the kernels package; both are loaded on the
first eligibility check or run. The kernels live in the ``autosdpa_kernels`` package (the repo's ``kernels/``
folder); from a plain source checkout without an install it is loaded from that folder directly.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import torch
from torch.nn.attention.bias import CausalBias

from ..config import triton_interpret_allowed
from .base import Backend, Call, register

_PKG = "autosdpa_kernels"
_kernels_pkg = None
_kernels_error: str | None = None


def _load_kernels():
    """The ``autosdpa_kernels`` package, or None (reason in ``_kernels_error``)."""
    global _kernels_pkg, _kernels_error
    if _kernels_pkg is not None or _kernels_error is not None:
        return _kernels_pkg
    try:
        _kernels_pkg = importlib.import_module(_PKG)
    except ImportError as exc:
        # source checkout: <repo>/autosdpa/backends/triton.py -> <repo>/kernels/__init__.py
        pkg_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                               "kernels")
        init = os.path.join(pkg_dir, "__init__.py")
        if os.path.isfile(init):
            spec = importlib.util.spec_from_file_location(_PKG, init, submodule_search_locations=[pkg_dir])
            mod = importlib.util.module_from_spec(spec)
            sys.modules[_PKG] = mod
            try:
                spec.loader.exec_module(mod)
                _kernels_pkg = mod
            except Exception as exc2:  # pragma: no cover
                sys.modules.pop(_PKG, None)
                _kernels_error = f"autosdpa_kernels failed to import: {exc2}"
        else:
            _kernels_error = f"autosdpa_kernels is not installed ({exc})"
    return _kernels_pkg


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


#: On the CPU the kernels only run under Triton's interpreter, which is a test tool (orders of magnitude
#: slower than any real backend). The backends therefore stay unavailable on the CPU unless this variable
#: is "1" as well, so that a process that merely has TRITON_INTERPRET=1 set (a test run) does not time them.
CPU_OPT_IN = "AUTOSDPA_TRITON_INTERPRET"


def _cpu_allowed() -> bool:
    return triton_interpret_allowed()


def _to_4d(q, k, v, mask):
    """(N, L, E) inputs get a head dim; a 3-D mask (N, L, S) then becomes (N, 1, L, S)."""
    if q.dim() == 3 and k.dim() == 3 and v.dim() == 3:
        if isinstance(mask, torch.Tensor) and mask.dim() == 3:
            mask = mask.unsqueeze(1)
        return q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), mask, True
    return q, k, v, mask, False


class _TritonBackend(Backend):
    torch_backend = None
    _module: str = ""

    def _kmod(self):
        pkg = _load_kernels()
        return None if pkg is None else getattr(pkg, self._module)

    def unavailable_reason(self, device) -> str | None:
        device = torch.device(device)
        if not _triton_installed():
            return "triton is not installed"
        if _load_kernels() is None:
            return _kernels_error
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _cpu_allowed():
            return None
        return (f"Triton kernels need a CUDA device (on the CPU only under the Triton interpreter, with "
                f"TRITON_INTERPRET=1 and {CPU_OPT_IN}=1); got {device.type}")

    def candidate_by_default(self, device) -> bool:
        return torch.device(device).type == "cuda"  # the CPU interpreter is for tests: forced use only

    def not_supported_reasons(self, call: Call) -> list[str]:
        reason = self.unavailable_reason(call.query.device)
        if reason:
            return [reason]
        q, k, v = call.query, call.key, call.value
        reasons: list[str] = []
        m = call.attn_mask
        if isinstance(m, CausalBias):
            if call.is_causal:
                reasons.append("CausalBias mask together with is_causal=True")
            if q.dim() >= 2 and (m.seq_len_q != q.shape[-2] or m.seq_len_kv != k.shape[-2]):
                reasons.append(f"CausalBias is {m.seq_len_q}x{m.seq_len_kv} but the inputs are "
                               f"{q.shape[-2]}x{k.shape[-2]}")
        elif m is not None and call.is_causal:
            reasons.append("attn_mask and is_causal=True both set (PyTorch rejects this)")
        mask = call.dense_mask
        if not (q.dim() == k.dim() == v.dim() and q.dim() in (3, 4)):
            return reasons + [f"only 3-D (N, L, E) or 4-D (B, H, L, E) inputs are supported; got "
                              f"{q.dim()}-D/{k.dim()}-D/{v.dim()}-D"]
        q, k, v, mask, _ = _to_4d(q, k, v, mask)
        reasons += self._kmod().not_supported_reasons(q, k, v, mask, call.dropout_p, call.causal,
                                                      call.enable_gqa, call.needs_grad)
        return reasons

    def _prepare(self, query, key, value, attn_mask, dropout_p, is_causal):
        if dropout_p and dropout_p > 0.0:
            raise RuntimeError(f"{self.name}: dropout_p > 0 is not supported")
        call = Call(query, key, value, attn_mask, dropout_p, is_causal)
        q, k, v, mask, squeeze = _to_4d(query, key, value, call.dense_mask)
        return q, k, v, mask, call.causal, squeeze

    def run(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False):
        q, k, v, mask, causal, squeeze = self._prepare(query, key, value, attn_mask, dropout_p, is_causal)
        out = self._kmod().attention(q, k, v, attn_mask=mask, causal=causal, scale=scale, enable_gqa=enable_gqa)
        return out.squeeze(1) if squeeze else out

    def runner(self, call: Call):
        # Forward calls set up once per layout: the checks, mask strides, tile config and grid cost ~35-45 us
        # of Python per call otherwise (2-core dev VM, launch stubbed), more than a decode kernel runs.
        if call.needs_grad or call.dropout_p:
            return self.run
        q, k, v, mask, causal, squeeze = self._prepare(*call.args()[:6])
        try:
            fwd = self._kmod().forward_runner(q, k, v, mask, causal, call.enable_gqa)
        except Exception:  # noqa: BLE001 - anything unusual takes the checked path, which raises what it raises
            return self.run
        checked = self.run

        def run(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            m = None if attn_mask is None or attn_mask.__class__ is CausalBias else attn_mask
            try:
                if not squeeze:
                    return fwd(query, key, value, m, scale)
                m = m if m is None or m.dim() != 3 else m.unsqueeze(1)
                return fwd(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), m, scale).squeeze(1)
            except ValueError:  # the TF32 setting changed since: the checked path reads it anew
                return checked(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        return run

    def ready(self, call: Call) -> bool:
        """True when running this call now would neither compile nor autotune a kernel (it ran with the same
        key in this process), so it is safe during CUDA-graph capture; False when unsure."""
        kmod = self._kmod()
        if kmod is None or self.not_supported_reasons(call):
            return False
        q, k, v, mask, _ = _to_4d(call.query, call.key, call.value, call.dense_mask)
        return bool(kmod.ready(q, k, v, mask, call.causal, call.enable_gqa, call.needs_grad))

    def workspace_bytes(self, call: Call) -> int:
        kmod = self._kmod()
        q, k, v, _, _ = _to_4d(call.query, call.key, call.value, None)
        if kmod is None or q.dim() != 4:
            return 0
        try:
            return int(self._workspace(kmod, q, k, v, call))
        except Exception:
            return 0


class TritonFlash(_TritonBackend):
    """FlashAttention-2 style Triton kernel: forward + backward, masks, causal (both alignments), GQA."""

    name = "triton_flash"
    supports_grad = True
    _module = "flash"

    def _workspace(self, kmod, q, k, v, call):
        return kmod.workspace_bytes(q, k, v, needs_grad=call.needs_grad)


class TritonDecode(_TritonBackend):
    """Split-KV decoding kernel: Lq <= 16, long Lk, GQA-aware; forward only."""

    name = "triton_decode"
    supports_grad = False
    _module = "decode"

    def _workspace(self, kmod, q, k, v, call):
        return kmod.workspace_bytes(q, k, v)


register(TritonFlash())
register(TritonDecode())

__all__ = ["TritonFlash", "TritonDecode", "CPU_OPT_IN"]
