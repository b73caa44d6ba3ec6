import os

# Before torch/numpy load: BLAS threads would slow later torch CPU timings many-fold.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("AUTOSDPA_BUDGET", "0.02")  # seconds of timing per problem: tests check logic, not speed

import pytest  # noqa: E402
import torch  # noqa: E402

# Without CUDA the Triton kernel tests run on Triton's interpreter, which must be chosen before anything
# imports triton (autosdpa does, through torch.nn.attention.bias). The dispatcher still leaves the Triton
# backends out on the CPU unless AUTOSDPA_TRITON_INTERPRET=1 (tests/kernels sets it for its own tests).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _all_pytorch_backends_on():
    """Every test starts with all of PyTorch's sdp flags on (and restores what it found), so a test that
    leaves them changed cannot colour the next one's eligibility."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
                      SDPBackend.CUDNN_ATTENTION]):
        yield


@pytest.fixture(autouse=True)
def _fresh_autosdpa(tmp_path, monkeypatch):
    """Every test gets its own database file and a dispatcher with empty in-memory caches."""
    import autosdpa

    monkeypatch.setenv("AUTOSDPA_DB", str(tmp_path / "autosdpa.sqlite"))
    monkeypatch.delenv("AUTOSDPA_MODE", raising=False)
    monkeypatch.delenv("AUTOSDPA_SHARED_DBS", raising=False)
    monkeypatch.delenv("AUTOSDPA_RECORD", raising=False)
    autosdpa.reset()
    yield
    autosdpa.unpatch()
    autosdpa.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
