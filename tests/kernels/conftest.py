"""Kernel tests: run Triton on the CPU interpreter when there is no GPU.

Triton decides interpreter vs compiled mode when a ``@triton.jit`` function is *defined*, and that includes
Triton's own standard library (``tl.zeros`` & co.), defined when triton is first imported. So without CUDA
``TRITON_INTERPRET=1`` is set here, at import time, which pytest reaches before collecting these test
modules. If triton was already imported in compiled mode (e.g. ``pytest tests/test_x.py tests/kernels``
where an earlier module imported ``torch.nn.attention.bias``, which imports triton), the CPU kernel tests
are skipped with a message; set ``TRITON_INTERPRET=1`` in the environment (or in ``tests/conftest.py``) to
avoid that.

The dispatcher's CPU candidate set is unaffected: the ``triton_*`` *backends* are only available on the
CPU when ``AUTOSDPA_TRITON_INTERPRET=1`` is also set, which the fixture below does for these tests only.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# One tile config per kernel and key: the tests check results, not speed, and on a GPU each extra config is a
# compile plus a benchmark (export AUTOSDPA_KERNEL_CONFIGS=all to test the autotuned path).
os.environ.setdefault("AUTOSDPA_KERNEL_CONFIGS", "one")
_CPU = not torch.cuda.is_available()
_TRITON_WAS_IMPORTED = "triton" in sys.modules
if _CPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _stale_triton() -> str | None:
    """Why the CPU kernel tests cannot run in this process (None when they can)."""
    if not _CPU or importlib.util.find_spec("triton") is None:
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "TRITON_INTERPRET is set to something other than 1 and there is no CUDA device"
    if _TRITON_WAS_IMPORTED:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(tl.zeros, InterpretedFunction):
            return ("triton was imported before TRITON_INTERPRET=1 was set; run the kernel tests first or "
                    "export TRITON_INTERPRET=1")
    return None


_STALE = _stale_triton()


def _alias_kernels() -> None:
    """Make ``import autosdpa_kernels`` work from a source checkout without an (editable) install."""
    try:
        import autosdpa_kernels  # noqa: F401
        return
    except ImportError:
        pass
    pkg_dir = os.path.join(_ROOT, "kernels", "autosdpa_kernels")
    spec = importlib.util.spec_from_file_location("autosdpa_kernels", os.path.join(pkg_dir, "__init__.py"),
                                                  submodule_search_locations=[pkg_dir])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["autosdpa_kernels"] = mod
    spec.loader.exec_module(mod)


_alias_kernels()
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def pytest_collection_modifyitems(config, items):
    if not _STALE:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    skip = pytest.mark.skip(reason=_STALE)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _triton_backends_on_cpu(monkeypatch):
    """Let the triton_* backends run on the CPU interpreter in these tests only."""
    if _CPU:
        monkeypatch.setenv("AUTOSDPA_TRITON_INTERPRET", "1")
    yield
