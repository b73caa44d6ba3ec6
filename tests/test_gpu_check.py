"""The device check (``scripts/gpu_check.sh``) rehearsed on the CPU, and the target arithmetic of
``scripts/bench_kernels.py`` on made-up timings."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _env(out, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "AUTOSDPA_"))}
    # python3 in the script must be this interpreter (the device's is the image's)
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""), OUT=str(out),
               GPU_CHECK_DEVICE="cpu", GPU_CHECK_TESTS="tests/kernels/test_kernel_decode.py")
    env.update(extra)
    return env


@pytest.mark.slow  # eight Python starts that import torch: about a minute on two cores, more when they are busy
def test_cpu_rehearsal_runs_every_step_and_names_the_db_after_the_gpu_model(tmp_path):
    out = tmp_path / "out"
    # generous limits: a busy CI machine must not turn a slow import into a failure
    env = _env(out, GPU_CHECK_GPU_NAME="NVIDIA H100 80GB HBM3", GPU_CHECK_SCALE="4", GPU_CHECK_DEADLINE="1500")
    res = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=1600)
    summary = (out / "summary.txt").read_text()
    assert res.returncode == 0, summary + res.stderr[-2000:]
    for step in ("facts", "pytest_gpu", "kernel_targets", "tune", "bench", "warm_start", "export_db", "runners"):
        assert f"[{step}] rc=" in summary, step
    assert "[facts] rc=0" in summary and "[tune] rc=0" in summary and "[export_db] rc=0" in summary
    assert "[kernel_targets] rc=2" in summary          # no CUDA here: the benchmark says so and stops
    assert "gpu tag: h100" in summary                  # "NVIDIA H100 80GB HBM3": the model, not "HBM3"
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and "h100.sqlite" in files and "junit_gpu.xml" in files, files
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "tuning_db/h100.sqlite" in names and "logs/pytest_gpu.log" in names
    assert any(n.startswith("benchmarks/tune_llama3_h100") for n in names)
    assert "benchmarks/warm_start_cpu.md" in names and "[warm_start] rc=0" in summary
    assert "benchmarks/runners_cpu.md" in names and "[runners] rc=0" in summary


def test_steps_are_stopped_with_sigint_even_when_started_in_the_background(tmp_path):
    """A shell's background job ignores SIGINT; the check restores it so pytest can write its summary."""
    out = tmp_path / "out"
    slow = tmp_path / "test_slow_gpu_step.py"  # outlasts its limit on any machine, however fast
    slow.write_text("import time\nimport pytest\n\n\n@pytest.mark.gpu\ndef test_waits():\n    time.sleep(120)\n")
    env = _env(out, GPU_CHECK_SCALE="0.04", GPU_CHECK_DEADLINE="40", GPU_CHECK_TESTS=str(slow))
    res = subprocess.run(["bash", "-c", f"bash '{SCRIPT}' & wait $!"], env=env, capture_output=True, text=True,
                         timeout=200)
    summary = (out / "summary.txt").read_text()
    assert res.returncode == 0, summary
    assert "[pytest_gpu] rc=124 (stopped at its 3s limit)" in summary, summary
    with tarfile.open(out / "results.tar.gz") as tar:
        log = tar.extractfile("logs/pytest_gpu.log").read().decode()
    assert "KeyboardInterrupt" in log or "Interrupted" in log, log[-2000:]


def test_missing_packages_stop_the_check_at_once_with_one_line(tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sqlalchemy.py").write_text("raise ImportError('no sqlalchemy on this image')\n")
    out = tmp_path / "out"
    res = subprocess.run(["bash", SCRIPT], env=_env(out, PYTHONPATH=str(fake)), capture_output=True, text=True,
                         timeout=200)
    summary = (out / "summary.txt").read_text().strip().splitlines()
    assert res.returncode == 3 and len(summary) == 1, summary
    assert summary[0].startswith("STOP: cannot import") and "no sqlalchemy on this image" in summary[0]


# ------------------------------------------------------------------------------------------------------------
def _bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(ROOT, "scripts", "bench_kernels.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(bk, case, times):
    c = bk._case(**case)
    res = {n: {"status": "ok", "median_s": t, "tflops": bk.flops(c) / t / 1e12, "gbps": bk.min_bytes(c) / t / 1e9}
           for n, t in times.items()}
    return dict(name=bk.case_name(c), mode="fwd", case=c, results=res)


def test_targets_ratios_bandwidth_and_missed_marks():
    bk = _bench()
    assert bk.hbm_peak("NVIDIA H100 80GB HBM3") == 3.0e12 and bk.hbm_peak("NVIDIA H200") == 4.3e12
    prefill = dict(group="prefill", B=16, Hq=16, Hkv=16, Lq=2048, Lk=2048, D=128, causal="top_left")
    dec = dict(group="decode", B=8, Hq=32, Hkv=8, Lq=1, Lk=8192, D=128)
    kv_s = bk.kv_bytes(bk._case(**dec)) / 3.0e12           # time to read K and V once at full H100 bandwidth
    rows = [_row(bk, prefill, {"flash": 1.2e-3, "cudnn": 0.9e-3, "triton_flash": 1.0e-3}),
            _row(bk, dec, {"flash": 2 * kv_s, "triton_decode": kv_s / 0.75})]
    tg = {t["backend"] + str(i): t for i, t in enumerate(bk.targets(rows, "NVIDIA H100 80GB HBM3"))}
    flash_t, gqa_t, dec_t = tg["triton_flash0"], tg["triton_flash1"], tg["triton_decode2"]
    (case,) = flash_t["cases"]
    assert [round(c["ratio"], 2) for c in case["checks"]] == [1.2, 0.9] and flash_t["met"]
    assert not gqa_t["met"] and gqa_t["cases"] == []       # no masked GQA row: not met
    (case,) = dec_t["cases"]
    assert round(case["checks"][0]["ratio"], 2) == 0.75 and not case["ok"] and not dec_t["met"]
    text = "\n".join(bk.target_lines(bk.targets(rows, "NVIDIA H100 80GB HBM3")))
    assert "MISSED" in text and "0.75x of HBM 3.0 TB/s (need 0.80x, MISSED)" in text
    assert "TFLOP/s" in text and "GB/s" in text
