"""Every script in examples/ runs as a user would run it (a fresh process) and prints the result it claims."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# Each example is a fresh Python process (torch import, tuning, for one torch.compile): `-m "not slow"` skips them.
slow = pytest.mark.slow


def _run(name, tmp_path, **env):
    """Run one example with its own database (the examples themselves never set AUTOSDPA_DB); its stdout."""
    full_env = {**os.environ, "AUTOSDPA_DB": str(tmp_path / "examples.sqlite"), **env}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], env=full_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def _number(label, out):
    m = re.search(re.escape(label) + r"\s*([-+0-9.e]+)", out)
    assert m, f"{label!r} not in:\n{out}"
    return float(m.group(1))


def _chose(out):
    """The backend autosdpa.explain reported: a real backend name, or 'pytorch' for a passthrough."""
    m = re.search(r"^autosdpa chose[^:]*: (\w+) \(", out, re.M)
    assert m, out
    return m.group(1)


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(
        ["train_causal_self_attention.py", "transformer_encoder_padding.py", "hf_generate.py",
         "compiled_model.py", "nested_tensor_batch.py"])


@slow
def test_causal_self_attention_training(tmp_path):
    out = _run("train_causal_self_attention.py", tmp_path)
    plain = [float(x) for x in re.search(r"losses \(plain F.sdpa\):\s*(.*)", out).group(1).split()]
    tuned = [float(x) for x in re.search(r"losses \(autosdpa\):\s*(.*)", out).group(1).split()]
    assert len(tuned) == len(plain) == 8 and tuned[-1] < tuned[0]
    assert "loss decreased: True" in out
    assert _number("max loss difference vs plain:", out) <= 1e-4
    assert _chose(out) in ("math", "flash")


@slow
def test_transformer_encoder_padding(tmp_path):
    out = _run("transformer_encoder_padding.py", tmp_path)
    assert "outputs equal: True" in out
    assert _number("on real tokens:", out) <= 1e-5
    assert _number("gradient max |autosdpa - plain|:", out) <= 1e-5
    assert _chose(out) in ("math", "flash")


@slow
def test_hugging_face_generate(tmp_path):
    pytest.importorskip("transformers")
    out = _run("hf_generate.py", tmp_path)
    assert "tokens equal: True" in out
    assert _chose(out) in ("math", "flash")


@slow
def test_hugging_face_example_without_transformers_says_so(tmp_path):
    """transformers hidden from the example's process: it explains and exits cleanly."""
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "transformers.py").write_text("raise ImportError('hidden for this test')\n")
    path = os.pathsep.join([str(tmp_path / "hide"), os.environ.get("PYTHONPATH", "")])
    out = _run("hf_generate.py", tmp_path, PYTHONPATH=path)
    assert "transformers is not installed" in out


@slow
def test_compiled_model(tmp_path):
    out = _run("compiled_model.py", tmp_path)
    assert "outputs equal: True" in out
    assert _number("compiled max |compiled - eager|:", out) <= 1e-5
    assert _chose(out) in ("math", "flash")


@slow
def test_nested_tensor_batch(tmp_path):
    out = _run("nested_tensor_batch.py", tmp_path)
    assert "output is nested: True" in out
    assert _number("max |autosdpa - F.sdpa|:", out) <= 1e-5
    assert _number("max |autosdpa - per-sequence dense attention|:", out) <= 1e-5
    assert "|layout=jagged|" in out
    assert _chose(out) in ("njt_pytorch", "njt_padded", "njt_split")
    assert _number("causal max |autosdpa - per-sequence dense causal attention|:", out) <= 1e-5
    causal = re.search(r"^autosdpa chose for causal: (\w+) \(", out, re.M)
    assert causal and causal.group(1) in ("njt_padded", "njt_split")  # PyTorch's NJT path: no causal on CPU
    assert "F.sdpa with is_causal=True on this device: RuntimeError" in out
