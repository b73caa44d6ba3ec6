"""Every Triton kernel compiles for Hopper (sm_90a) on this CPU-only machine: ``scripts/compile_kernels.py
--quick`` with the venv's Triton and with the device image's Triton 3.6 (``.triton36``, installed by
``scripts/test.sh``; this test installs it when missing and skips only if that is impossible).

The interpreter that runs the kernel tests on the CPU does not enforce the compiler's rules (a plain global
in ``@triton.jit`` code once broke every kernel on every GPU while all CPU tests passed); this does.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "compile_kernels.py")
T36 = os.path.join(ROOT, ".triton36")
KERNELS = {"fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq", "decode_split", "reference_fwd"}
H100_SMEM = 232_448
HOT_TARGET = 1.05   # issue 19: the forward's hot loop within 5 % of the tutorial-style reference's


def _triton36() -> str | None:
    """Path to a Triton 3.6.0 install, installing it when missing; None (with the reason) if impossible."""
    if os.path.isdir(os.path.join(T36, "triton")):
        return None
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", T36,
                          "triton==3.6.0"], capture_output=True, text=True, timeout=1200)
    if res.returncode != 0:
        shutil.rmtree(T36, ignore_errors=True)
        return ("cannot install triton 3.6.0 into .triton36 (run scripts/test.sh, or pip install --no-deps "
                f"--target .triton36 triton==3.6.0): {(res.stderr or res.stdout).strip().splitlines()[-1:]}")
    return None


def _start(tmp, tag, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "AUTOSDPA_KERNEL_CONFIGS")}
    env["OPENBLAS_NUM_THREADS"] = "1"
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
    out = os.path.join(tmp, f"{tag}.json")
    proc = subprocess.Popen([sys.executable, SCRIPT, "--quick", "--no-spills", "--json", out], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both quick runs start at once (each is ~40 s of compiling on one core)."""
    tmp = str(tmp_path_factory.mktemp("compile"))
    started = {"venv": _start(tmp, "venv")}
    why = _triton36()
    started["3.6"] = why or _start(tmp, "t36", T36)
    yield started
    for v in started.values():
        if not isinstance(v, str) and v[0].poll() is None:
            v[0].kill()


def _finish(run):
    proc, path = run
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"compile check failed (exit {proc.returncode}):\n{out[-6000:]}"
    with open(path) as f:
        doc = json.load(f)
    return doc, out


def _check(doc, version_prefix):
    (ver,) = doc["runs"]
    assert ver.startswith(version_prefix)
    recs = doc["records"]
    assert {r["kernel"] for r in recs} == KERNELS
    for r in recs:
        assert r["ok"], r
        assert r["registers"] > 0 and r["spill_bytes"] == 0, r
        assert r["shared_bytes"] <= H100_SMEM, r
        if "smem_model" in r:    # the pruner's estimate may not be below what the compiler allocates
            assert r["shared_bytes"] <= r["smem_model"], r
    fwd_bf16 = [r for r in recs if r["kernel"] == "fwd" and r["dtype"] == "bf16"]
    assert fwd_bf16 and all(r["wgmma"] for r in fwd_bf16)          # Hopper tensor cores, not mma.sync
    assert any(r["mask"] == "bool" for r in recs) and any(r["dtype"].startswith("fp32") for r in recs)
    assert any("stride_qb" in r["i64_args"] for r in recs)          # the > 2^31-element case compiled
    # K/V through TMA in the hot loops of the bf16 forward and decode (one load each per iteration; only a
    # mask tile still comes through cp.async)
    for r in recs:
        if r["kernel"] in ("fwd", "decode_split") and r["dtype"] == "bf16":
            assert r["tma"] and r["hot_loop"]["tma_loads"] == 2, r["case"]
            assert r["hot_loop"]["cp_async"] == 0 or r["mask"] != "none", r["case"]
    # dK/dV: 32-row Q steps, no m64n8 wgmma
    (dkdv,) = [r for r in recs if r["kernel"] == "bwd_dkdv"]
    assert dkdv["wgmma_shapes"] and not any(s.startswith("m64n8k") for s in dkdv["wgmma_shapes"]), dkdv
    # the forward's hot loop against the reference compiled with the same config
    (ref,) = [r for r in recs if r["kernel"] == "reference_fwd"]
    (fwd,) = [r for r in fwd_bf16 if r["case"] == "fwd bf16 D=128 mask=none causal=none"]
    assert fwd["config"] == ref["config"] == "128x128 w8 s3"
    assert fwd["hot_per_tile"] <= HOT_TARGET * ref["hot_per_tile"], (fwd["hot_loop"], ref["hot_loop"])


def test_kernels_compile_for_sm90_with_the_venv_triton(runs):
    doc, _ = _finish(runs["venv"])
    import triton
    _check(doc, triton.__version__)


def test_kernels_compile_for_sm90_with_triton_3_6(runs):
    if isinstance(runs["3.6"], str):
        pytest.skip(runs["3.6"])
    doc, _ = _finish(runs["3.6"])
    _check(doc, "3.6")


PTX = """
.visible .entry k(
{
	mov.u32 	%r1, 0;
$L__BB0_1:
	ld.global.b32 	%r2, [%rd1];
$L__BB0_2:                              // inner
	wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%r3}, %rd2, %rd3, 0, 1, 1, 0, 0;
	@%p1 cp.async.bulk.tensor.4d.shared::cta.global.mbarrier::complete_tx::bytes [%r4], [%rd4, {%r5}], [%r6];
	// a comment;
	@%p2 bra 	$L__BB0_2;
	add.s32 	%r1, %r1, 1;
	@%p3 bra 	$L__BB0_1;
$L__BB0_3:
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r7}, {%r8}, {%f2};
	cp.async.cg.shared.global [%r9], [%rd5], 16;
	@%p4 bra 	$L__BB0_3;
	ret;
}
"""


def test_the_ptx_report_finds_the_innermost_loops_and_the_tensor_core_hot_loop():
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import compile_kernels as ck
    loops = ck.ptx_loops(PTX)
    assert [lp["instructions"] for lp in loops] == [3, 3]         # the outer loop (it holds loop 2) is left out
    assert loops[0] == dict(instructions=3, wgmma=1, mma=0, tma_loads=1, cp_async=0)
    assert loops[1] == dict(instructions=3, wgmma=0, mma=1, tma_loads=0, cp_async=1)
    rep = ck.ptx_report(PTX, 64, 32)
    assert rep["wgmma_shapes"] == {"m64n32k16": 1} and rep["tma_loads"] == 1 and rep["cp_async"] == 1
    assert rep["hot_loop"] == loops[0] and rep["hot_per_tile"] == 3 * 128 * 128 // (64 * 32)


def test_compile_only_never_touches_the_gpu_driver():
    """The script's stand-in driver raises, so a quick run that passes compiled without a driver."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import compile_kernels as ck; ck.setup_env(None); "
            "ck.forbid_driver(); from triton.runtime.driver import driver\n"
            "try:\n    driver.active.get_current_target()\nexcept RuntimeError as e:\n    print('refused:', e)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code, os.path.dirname(SCRIPT)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert "refused: compile-only run used the GPU driver" in res.stdout, res.stdout + res.stderr
