"""Environment fingerprints: everything that can change which backend wins on a device, and nothing more.

Two fingerprints per device, so that a version change invalidates only the rows it can affect:

* ``environment(device)`` (``kernels=False``): what PyTorch's backends depend on: device name, capability,
  SM / core count, memory, torch, CUDA, cuDNN. The ``triton`` and ``kernels`` fields are empty: installing or
  upgrading Triton does not touch PyTorch's measurements.
* ``environment(device, kernels=True)``: the same plus Triton's version and a hash of this project's kernel
  sources (the ``autosdpa_kernels`` package's ``.py`` files), for the rows of this project's kernels: editing a
  kernel invalidates its timings by itself, with no constant to bump by hand.

On the CPU the thread count is *not* part of the fingerprint (``cores`` is the machine's CPU count): timed with
1 and 2 threads, math against flash, it did not change the winner of any shape (``benchmarks/cpu_threads.md``),
so running with another thread count reuses the measurements.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import platform
from pathlib import Path

import torch

from .records import fingerprint_of

KERNELS_PACKAGE = "autosdpa_kernels"


def _pkg_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def kernels_hash(package: str = KERNELS_PACKAGE) -> str:
    """12 hex digits of the SHA-256 of the package's ``.py`` files (names and contents, in name order), found
    without importing it; "" when it is not installed. Computed once per process."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return ""
    h = hashlib.sha256()
    for root in spec.submodule_search_locations:
        base = Path(root)
        for f in sorted(base.rglob("*.py")):
            if "__pycache__" in f.parts:
                continue
            h.update(f.relative_to(base).as_posix().encode() + b"\0")
            h.update(f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def _describe(device_type: str, index: int | None, kernels: bool) -> tuple[str, dict]:
    info = {
        "device_type": device_type,
        "torch": torch.__version__.split("+")[0],
        "triton": _pkg_version("triton") if kernels else "",
        "kernels": kernels_hash() if kernels else "",
    }
    if device_type == "cuda":
        p = torch.cuda.get_device_properties(index or 0)
        info.update(device_name=p.name, capability=f"{p.major}.{p.minor}", cores=p.multi_processor_count,
                    memory_gb=round(p.total_memory / 2**30), cuda=torch.version.cuda or "",
                    cudnn=str(torch.backends.cudnn.version() or ""))
    else:
        info.update(device_name=cpu_name(), capability=torch.backends.cpu.get_cpu_capability(),
                    cores=os.cpu_count() or 0, memory_gb=0, cuda="", cudnn="")
    return fingerprint_of(info), info


def environment(device: torch.device | str = "cpu", kernels: bool = False) -> tuple[str, dict]:
    """(fingerprint, fields) of ``device``: ``kernels=False`` for PyTorch's backends' rows, ``kernels=True``
    for this project's kernels' rows (adds Triton's version and the kernels' source hash)."""
    dev = torch.device(device)
    index = dev.index if dev.index is not None else (torch.cuda.current_device() if dev.type == "cuda" else None)
    fp, info = _describe(dev.type, index, bool(kernels))
    return fp, dict(info)


def cache_clear() -> None:
    """Forget the computed fingerprints and kernel hash (after installing or editing something in-process)."""
    _describe.cache_clear()
    kernels_hash.cache_clear()
