"""Memory for tuning: what a device has free, and what checking and timing one call needs.

A candidate that cannot fit is skipped with a reason instead of being run: on a CPU the kernel's OOM killer
ends the whole process without an exception (``autosdpa tune --preset llama3-8b --train`` died at 23.6 GB
with no output), and on CUDA a failed allocation still fragments the cache for the candidates after it.

The estimates are upper bounds fitted to peak RSS measured on a CPU (torch 2.13); each says what it counts.
"""
from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch

#: At most this share of the free memory goes to one candidate's first call (the rest is margin: the
#: estimates are rough, and other processes allocate too).
MEMORY_FRACTION = 0.8

_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a huge number


def fmt_bytes(n: float) -> str:
    """``40.2 GB``, ``512 MB`` (decimal units, as ``free -h --si`` and most people read them)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def free_bytes(device: torch.device) -> int | None:
    """Bytes this process can still allocate on ``device``; None when unknown (another device type).

    CUDA: free device memory plus what PyTorch's caching allocator holds unused. CPU: ``MemAvailable``, or
    less when a cgroup memory limit (a container, a systemd slice) leaves less room."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    _trim_heap()
    found = [n for n in (_meminfo_available(), _cgroup_room()) if n is not None]
    return min(found) if found else None


_malloc_trim = None


def _trim_heap() -> None:
    """Give the pages the C heap holds for dead objects back to the system, so that what this process freed
    counts as free: tensors below glibc's (moving) mmap threshold stay in the heap after they die (4 GB of
    dead 4 MB tensors measured), and a problem tuned after a big one would look short of memory. glibc only."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room(root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The least room left under this process's cgroup memory limits (its own cgroup's and its ancestors',
    v2 or v1); None when none is set. Page cache that can be dropped (inactive files) counts as room."""
    rooms = []
    for d, (limit_f, usage_f, inactive_key) in _cgroup_dirs(root, self_cgroup):
        try:
            raw = (d / limit_f).read_text().strip()
            if raw == "max" or int(raw) >= _NO_LIMIT:
                continue
            usage = int((d / usage_f).read_text())
            stat = dict(line.split() for line in (d / "memory.stat").read_text().splitlines() if " " in line)
            rooms.append(int(raw) - (usage - int(stat.get(inactive_key, 0))))
        except (OSError, ValueError):
            continue
    return max(0, min(rooms)) if rooms else None


def _cgroup_dirs(root: Path, self_cgroup: Path):
    """(directory, (limit file, usage file, inactive-file stat)) for this process's memory cgroup and each of
    its ancestors, as mounted here (a container often mounts its own cgroup as the root)."""
    v2 = ("memory.max", "memory.current", "inactive_file")
    v1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    seen = set()
    for line in lines:
        hid, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hid == "0" and controllers == "":
            base, files = root, v2
        elif "memory" in controllers.split(","):
            base, files = root / "memory", v1
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for i in range(len(parts), -1, -1):
            d = base.joinpath(*parts[:i])
            if d not in seen and (d / files[0]).exists():
                seen.add(d)
                yield d, files


def room(device: torch.device, fraction: float = MEMORY_FRACTION) -> tuple[float, int] | None:
    """(bytes one candidate may use, bytes free) on ``device``; None when the free memory is unknown."""
    free = free_bytes(device)
    return None if free is None else (fraction * free, free)


# -- what one call needs ----------------------------------------------------------------------------------

def tensor_bytes(t: torch.Tensor | None) -> int:
    if t is None or not isinstance(t, torch.Tensor):
        return 0
    if t.is_nested:
        t = t.values()
    return t.numel() * t.element_size()


def compute_size(dtype: torch.dtype) -> int:
    """Bytes per element of the math backend's arithmetic: PyTorch's math op upcasts fp16/bf16 to fp32."""
    return max(4, dtype.itemsize)


def max_len(t: torch.Tensor) -> int:
    """The sequence length of ``t`` (the longest one of a jagged NestedTensor; all its tokens, an upper bound,
    where it does not know)."""
    if not t.is_nested:
        return t.shape[-2]
    try:
        return int(t._get_max_seqlen())
    except (AttributeError, RuntimeError):
        return t.values().shape[0]


def score_elems(q: torch.Tensor, k: torch.Tensor) -> int:
    """Elements of one attention score matrix for every query row: (rows of q) x Lk."""
    rows = (q.values() if q.is_nested else q).numel() // max(1, q.shape[-1])
    return rows * max_len(k)


def output_bytes(call) -> int:
    """The output: q's rows with v's head dim, in q's dtype."""
    q, v = call.query, call.value
    rows = (q.values() if q.is_nested else q).numel() // max(1, q.shape[-1])
    return rows * v.shape[-1] * q.element_size()


def io_bytes(call) -> int:
    """What each candidate's first call returns: its output, and the gradients of q, k, v when training."""
    n = output_bytes(call)
    if call.needs_grad:
        n += sum(tensor_bytes(t) for t in (call.query, call.key, call.value))
    return n


def setup_bytes(call) -> int:
    """What the tuner allocates once before any candidate runs: when training, q, k, v cloned to take
    gradients, and one upstream gradient shaped like the output."""
    if not call.needs_grad:
        return 0
    return sum(tensor_bytes(t) for t in (call.query, call.key, call.value)) + output_bytes(call)


def problem_input_bytes(problem) -> int:
    """q, k, v (and a dense mask) of a Problem's synthetic inputs, plus the float32 tensor each is drawn in."""
    size = _dtype_of(problem).itemsize
    wide = 2 if problem.layout == "strided" else 1
    rows_q = problem.tokens * problem.hq if problem.layout == "jagged" and problem.tokens else \
        problem.batch * problem.hq * problem.lq
    rows_k = problem.batch * problem.hkv * problem.lk
    elems = wide * (rows_q * problem.d + rows_k * (problem.d + problem.dv))
    mask = 0
    if problem.mask != "none":
        pattern = problem.mask.split(":")[1]
        full = dict(B=problem.batch, H=problem.hq, Q=problem.lq, K=problem.lk)
        mask = math.prod(full[c] if c != "1" else 1 for c in pattern) * 4
    biggest = max(rows_q * problem.d, rows_k * max(problem.d, problem.dv)) * wide
    return elems * size + biggest * 4 + mask


def _dtype_of(problem) -> torch.dtype:
    from .problem import DTYPES

    return DTYPES[problem.dtype]
