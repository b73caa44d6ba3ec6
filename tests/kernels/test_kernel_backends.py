"""The triton_flash / triton_decode backends as the dispatcher sees them."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

from kernel_ref import assert_close, make_qkv, reference

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Lower right causal bias")]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def mod():
    pytest.importorskip("triton")
    from autosdpa.backends import triton as tb
    return tb


def test_import_is_cheap():
    """Importing the backend module loads neither the kernels package nor any kernel module."""
    code = ("import sys; import autosdpa.backends.triton as t; "
            "assert 'autosdpa_kernels' not in sys.modules; "
            "pkg = t._load_kernels(); assert pkg is not None, t._kernels_error; "
            "import autosdpa_kernels.flash, autosdpa_kernels.decode; "
            "assert 'autosdpa_kernels._flash_kernels' not in sys.modules; "
            "assert 'autosdpa_kernels._decode_kernels' not in sys.modules; print('ok')")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_registered(mod):
    from autosdpa.backends import base
    assert isinstance(base.get("triton_flash"), mod.TritonFlash)
    assert isinstance(base.get("triton_decode"), mod.TritonDecode)
    assert base.get("triton_flash").supports_grad and not base.get("triton_decode").supports_grad
    assert base.get("triton_flash").torch_backend is None


def test_flash_backend_causal_bias_and_3d(mod):
    from autosdpa.backends.base import Call
    b = mod.TritonFlash()
    q, k, v = make_qkv(1, 2, 2, 9, 20, 32, device=DEV)
    cb = causal_lower_right(9, 20)
    call = Call(q, k, v, cb)
    assert call.causal == "bottom_right" and b.not_supported_reasons(call) == []
    assert_close(b.run(q, k, v, attn_mask=cb), reference(q, k, v, causal="bottom_right"), torch.float32)
    assert_close(b.run(q, k, v, attn_mask=causal_upper_left(9, 20)), reference(q, k, v, causal="top_left"),
                 torch.float32)
    # 3-D (N, L, E) with a 3-D mask
    q3, k3, v3 = q[0], k[0], v[0]
    m3 = torch.rand(2, 9, 20, device=DEV) > 0.3
    assert b.not_supported_reasons(Call(q3, k3, v3, m3)) == []
    out = b.run(q3, k3, v3, attn_mask=m3)
    ref = reference(q3.unsqueeze(0), k3.unsqueeze(0), v3.unsqueeze(0), m3.unsqueeze(0))[0]
    assert out.shape == q3.shape[:-1] + (32,)
    assert_close(out, ref, torch.float32)
    assert b.workspace_bytes(Call(q, k, v, needs_grad=True)) > b.workspace_bytes(Call(q, k, v)) > 0


def test_flash_backend_grad(mod):
    b = mod.TritonFlash()
    q, k, v = make_qkv(1, 2, 2, 16, 16, 16, device=DEV, requires_grad=True)
    out = b.run(q, k, v, is_causal=True, scale=0.5)
    ref = reference(q, k, v, causal="top_left", scale=0.5)
    for a, r in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        assert_close(a, r, torch.float32, grad=True)


def test_backend_reasons(mod):
    from autosdpa.backends.base import Call
    f, d = mod.TritonFlash(), mod.TritonDecode()
    q, k, v = make_qkv(1, 8, 2, 1, 100, 64, device=DEV)
    assert f.not_supported_reasons(Call(q, k, v, enable_gqa=True)) == []
    assert d.not_supported_reasons(Call(q, k, v, enable_gqa=True)) == []
    assert any("forward-only" in r for r in d.not_supported_reasons(Call(q, k, v, enable_gqa=True, needs_grad=True)))
    m = torch.ones(1, 100, dtype=torch.bool, device=DEV)
    assert any("is_causal" in r for r in f.not_supported_reasons(Call(q, q, q, m, is_causal=True)))
    assert any("dropout" in r for r in f.not_supported_reasons(Call(q, q, q, dropout_p=0.1)))
    q5 = q.unsqueeze(0)
    assert any("4-D" in r for r in f.not_supported_reasons(Call(q5, q5, q5)))
    assert f.unavailable_reason(torch.device("meta")) is not None


def test_decode_backend_run(mod):
    d = mod.TritonDecode()
    q, k, v = make_qkv(2, 8, 2, 1, 100, 64, device=DEV)
    with torch.no_grad():
        out = d.run(q, k, v, attn_mask=causal_lower_right(1, 100), enable_gqa=True)
    assert_close(out, reference(q, k, v, causal="bottom_right", enable_gqa=True), torch.float32)
    from autosdpa.backends.base import Call
    assert d.workspace_bytes(Call(q, k, v)) == 0        # 2 (batch, KV head) pairs x 100 keys: one split each
    q1, k1, v1 = make_qkv(1, 2, 1, 1, 300, 64, device=DEV)
    assert d.workspace_bytes(Call(q1, k1, v1, enable_gqa=True)) > 0   # one pair, 300 keys: split for the SMs


def test_cpu_needs_opt_in(mod, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    monkeypatch.delenv("AUTOSDPA_TRITON_INTERPRET", raising=False)
    assert "AUTOSDPA_TRITON_INTERPRET" in mod.TritonFlash().unavailable_reason(torch.device("cpu"))
    monkeypatch.setenv("AUTOSDPA_TRITON_INTERPRET", "1")
    assert mod.TritonDecode().unavailable_reason(torch.device("cpu")) is None
