"""Fingerprints: a Triton install leaves PyTorch's rows alone; a kernel edit invalidates only the kernels' rows
(issue 12, item 4); and what differs between environments of one device is said."""
from __future__ import annotations

import importlib.metadata
import sys

import pytest
import torch
from click.testing import CliRunner

from autosdpa import environment as E
from autosdpa.cli import main
from autosdpa.records import fingerprint_of
from autosdpa.sharing import env_change, env_differences
from autosdpa.store import Store

from .helpers import KEY, env, meas


@pytest.fixture(autouse=True)
def _fresh_fingerprints():
    E.cache_clear()
    yield
    E.cache_clear()


def _with_triton(monkeypatch, version: str | None) -> None:
    real = importlib.metadata.version

    def fake(name):
        if name == "triton":
            if version is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return version
        return real(name)
    monkeypatch.setattr(importlib.metadata, "version", fake)
    E.cache_clear()


def test_installing_triton_leaves_pytorchs_fingerprint_alone(monkeypatch):
    _with_triton(monkeypatch, None)
    fp_before, info = E.environment("cpu")
    kfp_before, kinfo_before = E.environment("cpu", kernels=True)
    assert info["triton"] == "" and info["kernels"] == "" and kinfo_before["triton"] == ""
    _with_triton(monkeypatch, "3.9.0")
    fp_after, _ = E.environment("cpu")
    kfp_after, kinfo = E.environment("cpu", kernels=True)
    assert fp_after == fp_before  # PyTorch's backends' rows stay reachable
    assert kfp_after != kfp_before and kinfo["triton"] == "3.9.0"  # the kernels' rows do depend on Triton
    assert kinfo["kernels"] == E.kernels_hash() != ""
    assert fp_after == fingerprint_of(info) and kfp_after == fingerprint_of(kinfo)
    for f in ("device_type", "device_name", "capability", "cores", "memory_gb", "torch", "cuda", "cudnn"):
        assert info[f] == kinfo[f]


def test_kernels_hash_follows_the_source_not_a_constant(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_kernels_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "flash.py").write_text("def kernel(): return 1\n")
    (pkg / "sub" / "more.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    h1 = E.kernels_hash("fake_kernels_pkg")
    assert len(h1) == 12
    (pkg / "README.md").write_text("docs do not count")
    E.cache_clear()
    assert E.kernels_hash("fake_kernels_pkg") == h1
    (pkg / "sub" / "more.py").write_text("X = 2\n")
    E.cache_clear()
    h2 = E.kernels_hash("fake_kernels_pkg")
    assert h2 != h1
    (pkg / "sub" / "more.py").rename(pkg / "sub" / "other.py")  # a rename is a change too
    E.cache_clear()
    assert E.kernels_hash("fake_kernels_pkg") not in (h1, h2)
    assert E.kernels_hash("no_such_package_here") == ""
    assert "fake_kernels_pkg" not in sys.modules  # hashed without being imported


def test_cpu_thread_count_is_not_part_of_the_cpu_fingerprint():
    """Measured (benchmarks/cpu_threads.md): the thread count did not change any winner, so rows measured
    with one thread count serve another."""
    import os

    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = E.environment("cpu")
        torch.set_num_threads(2)
        two = E.environment("cpu")
    finally:
        torch.set_num_threads(n)
    assert one == two and one[1]["cores"] == (os.cpu_count() or 0)


def test_what_differs_between_environments_of_one_device():
    old = {"fingerprint": "a" * 16, "created_at": 1.0, **env("H100", torch_version="2.12.0")[1]}
    new = {"fingerprint": "b" * 16, "created_at": 2.0, **env("H100", torch_version="2.13.0", triton="")[1]}
    other = {"fingerprint": "c" * 16, "created_at": 3.0, **env("A100")[1]}
    assert env_change(old, new) == "torch 2.12.0 → 2.13.0, triton 3.5.0 → (none)"
    assert env_differences([new, other, old]) == {"b" * 16: "vs aaaaaaaa: torch 2.12.0 → 2.13.0, triton 3.5.0 → (none)"}


def test_db_info_and_show_say_what_differs(tmp_path, monkeypatch):
    db = tmp_path / "user.sqlite"
    s = Store(str(db))
    s.save(*env("NVIDIA H100 80GB HBM3", torch_version="2.12.0"), KEY, [meas("math")])
    s.save(*env("NVIDIA H100 80GB HBM3", torch_version="2.13.0"), KEY, [meas("math")])
    s.close()
    r = CliRunner().invoke(main, ["db", "info", str(db)])
    assert r.exit_code == 0 and "torch 2.12.0 → 2.13.0" in r.output, r.output
    monkeypatch.setenv("COLUMNS", "200")
    r = CliRunner().invoke(main, ["show", "--db", str(db)])
    assert r.exit_code == 0 and "torch 2.12.0 → 2.13.0" in r.output, r.output
