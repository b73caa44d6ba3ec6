"""Tuning never takes the machine down: free memory is known on a CPU, what a candidate needs is estimated
(its workspace, the reference, the gradients) from above, and what cannot fit is skipped with a reason that
reaches the user whole. (`autosdpa tune --preset llama3-8b --train` on a 24 GB CPU machine was killed by the
kernel's OOM killer with no output at all.)"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from autosdpa import memory
from autosdpa.backends.base import Call
from autosdpa.backends.torch_backends import FLASH, MATH
from autosdpa.checks import Check, reference_bytes
from autosdpa.cli import main
from autosdpa.tuner import TuneConfig, _free_bytes, measure

REASON = re.compile(r"needs ~[\d.]+ [MG]B, [\d.]+ [MG]B free: not run \(tuning uses at most 80% of the free memory\)")


def _meminfo_available() -> int:
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="needs Linux's /proc/meminfo")
def test_the_tuner_knows_the_free_memory_of_a_cpu():
    free = _free_bytes(torch.device("cpu"))
    assert free is not None and 0 < free <= _meminfo_available() * 1.1


def _cgroup(tmp_path: Path, proc_line: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp_path / "self-cgroup"
    proc.write_text(proc_line + "\n")
    return root, proc


def test_cgroup_limits_bound_the_free_memory(tmp_path):
    gb = 10 ** 9
    # v2: the parent's limit is the tighter one; dropping inactive page cache counts as room
    root, proc = _cgroup(tmp_path, "0::/jobs/me", {
        "jobs/memory.max": f"{4 * gb}", "jobs/memory.current": f"{3 * gb}", "jobs/memory.stat": f"inactive_file {gb}\n",
        "jobs/me/memory.max": "max", "jobs/me/memory.current": f"{gb}", "jobs/me/memory.stat": "inactive_file 0\n"})
    assert memory._cgroup_room(root, proc) == 2 * gb
    # v1: "no limit" is a huge number
    root, proc = _cgroup(tmp_path / "v1", "4:memory:/a", {
        "memory/a/memory.limit_in_bytes": "9223372036854771712", "memory/a/memory.usage_in_bytes": "5",
        "memory/a/memory.stat": "total_inactive_file 0\n"})
    assert memory._cgroup_room(root, proc) is None
    root, proc = _cgroup(tmp_path / "v1b", "4:cpu,memory:/a", {
        "memory/a/memory.limit_in_bytes": f"{3 * gb}", "memory/a/memory.usage_in_bytes": f"{2 * gb}",
        "memory/a/memory.stat": f"total_inactive_file {gb // 2}\n"})
    assert memory._cgroup_room(root, proc) == 3 * gb // 2


# The estimates must hold what really happens: peak RSS of the real call, in a child per measurement (the
# peak RSS of a process only grows).
PEAK_RSS = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
from autosdpa.backends import torch_ops
from autosdpa.backends.base import Call
from autosdpa.checks import Check
what, dtype, h, l, d = sys.argv[1], getattr(torch, sys.argv[2]), *map(int, sys.argv[3:])
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def inputs(n, l):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, n, l, d, generator=g).to(dtype).requires_grad_() for _ in range(3)]
small = inputs(1, 8)
torch.autograd.grad(torch_ops.run("math", *small, None, 0.0, True, None, False).sum(), small)  # lazy set-up
q, k, v = inputs(h, l)
g = torch.randn(1, h, l, d).to(dtype)
base = rss()
if what == "math":
    o = torch_ops.run("math", q, k, v, None, 0.0, True, None, False)
    grads = torch.autograd.grad(o, (q, k, v), g)
else:
    Check(Call(q, k, v, None, 0.0, True, None, False, needs_grad=True), g)
print(json.dumps(rss() - base))
"""


@pytest.mark.parametrize("what, dtype, h, l, d", [
    ("math", "bfloat16", 8, 2048, 128),   # math upcasts bf16: its scores are fp32
    ("math", "float32", 8, 2048, 64),
    ("reference", "bfloat16", 2, 4096, 128),  # the part Check computes: one head, fp32
    ("reference", "float32", 2, 4096, 64),  # fp64
])
def test_estimates_hold_the_real_peak_memory(what, dtype, h, l, d):
    r = subprocess.run([sys.executable, "-c", PEAK_RSS, what, dtype, str(h), str(l), str(d)], capture_output=True,
                       text=True, timeout=300, env={"OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    peak = json.loads(r.stdout)
    q, k, v = (torch.empty(1, h, l, d, dtype=getattr(torch, dtype)) for _ in range(3))
    call = Call(q, k, v, None, 0.0, True, None, False, needs_grad=True)
    est = MATH.workspace_bytes(call) + memory.io_bytes(call) if what == "math" else reference_bytes(call)[0]
    assert peak <= est <= 4 * peak, (peak, est)


def _train_call():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2048, 64, generator=g) for _ in range(3))
    return Call(q, k, v, None, 0.0, True, None, False, needs_grad=True)


def test_a_candidate_that_cannot_fit_is_skipped_and_pytorch_s_pick_still_timed(monkeypatch):
    """math's scores for this call need ~0.5 GB; with 200 MB free it is skipped, flash (PyTorch's pick) runs."""
    monkeypatch.setattr(memory, "free_bytes", lambda device: 200 * 10 ** 6)
    call = _train_call()
    rows = {m.backend: m for m in measure(call, [MATH, FLASH], TuneConfig(budget_s=0.05))}
    assert rows["math"].status == "skipped" and REASON.fullmatch(rows["math"].detail), rows["math"].detail
    assert "200 MB free" in rows["math"].detail
    assert rows["flash"].status == "ok" and rows["flash"].samples >= 1


def test_a_reference_that_cannot_fit_is_not_computed(monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda device: 10 ** 6)
    call = _train_call()
    check = Check(call, torch.randn(1, 8, 2048, 64))
    assert check.pieces is None
    assert re.fullmatch(r"the reference needs ~[\d.]+ [MG]B, 1 MB free: output not compared", check.unchecked)


def test_the_tune_table_shows_a_memory_reason_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda device: 200 * 10 ** 6)
    r = CliRunner().invoke(main, ["tune", "--db", str(tmp_path / "t.sqlite"), "--device", "cpu", "--budget", "0.05",
                                  "--shape", "b=1,hq=8,lq=2048,d=64,causal,train"])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if "math:" in x)
    assert REASON.search(line), r.output  # on one line, not cut, not folded (the output is not a terminal)


def test_inputs_too_large_for_the_memory_are_not_made():
    """A problem whose inputs alone exceed the free memory is a failed row, not an allocation."""
    r = CliRunner().invoke(main, ["tune", "--db", "sqlite://", "--device", "cpu", "--json",
                                  "--shape", "b=64,hq=64,lq=65536,d=128"])
    assert r.exit_code == 1
    (row,) = json.loads(r.stdout)["results"]
    assert re.search(r"its inputs alone need ~[\d.]+ GB, [\d.]+ GB free: not tuned", row["error"]), row["error"]


HEAP = r"""
import torch
from autosdpa import memory
def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096
r0 = rss()
big = torch.ones(30_000_000 // 4); del big  # glibc raises its mmap threshold past 30 MB
tensors = [torch.ones(1_000_000 // 4) for _ in range(1000)]  # 1 GB in 1 MB pieces: from the heap now
kept = tensors[::50]  # a few live ones in between: the heap cannot shrink from its top
del tensors
r1 = rss()
memory.free_bytes(torch.device("cpu"))
print(r0, r1, rss())
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux's /proc")
def test_memory_this_process_freed_counts_as_free():
    r = subprocess.run([sys.executable, "-c", HEAP], capture_output=True, text=True, timeout=120,
                       env={"OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    r0, r1, r2 = map(int, r.stdout.split())
    if r1 - r0 < 5 * 10 ** 8:
        pytest.skip("this allocator returns freed memory by itself")
    assert r2 - r0 < 2 * 10 ** 8, (r0, r1, r2)
