"""Environment fingerprint: everything that can change which backend wins on a device."""
from __future__ import annotations

import functools
import importlib.metadata
import platform

import torch

from .store import fingerprint_of

KERNELS_VERSION = "1"  # bump when kernels/ changes in a way that invalidates its timings


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
def _describe(device_type: str, index: int | None, threads: int) -> tuple:
    info = {
        "device_type": device_type,
        "torch": torch.__version__.split("+")[0],
        "triton": _pkg_version("triton"),
        "kernels": KERNELS_VERSION,
    }
    if device_type == "cuda":
        p = torch.cuda.get_device_properties(index or 0)
        info.update(device_name=p.name, capability=f"{p.major}.{p.minor}", cores=p.multi_processor_count,
                    memory_gb=round(p.total_memory / 2**30), cuda=torch.version.cuda or "",
                    cudnn=str(torch.backends.cudnn.version() or ""))
    else:
        info.update(device_name=cpu_name(), capability=torch.backends.cpu.get_cpu_capability(), cores=threads,
                    memory_gb=0, cuda="", cudnn="")
    return fingerprint_of(info), info


def environment(device: torch.device | str = "cpu") -> tuple[str, dict]:
    """(fingerprint, fields) for ``device``; CPU fingerprints include the thread count, which moves timings."""
    dev = torch.device(device)
    threads = torch.get_num_threads() if dev.type == "cpu" else 0
    index = dev.index if dev.index is not None else (torch.cuda.current_device() if dev.type == "cuda" else None)
    return _describe(dev.type, index, threads)
