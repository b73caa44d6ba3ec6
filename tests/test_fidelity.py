"""Drop-in means identical on every path: cache hits, degenerate calls, shared claims, warnings, threads."""
import logging
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import autosdpa
from autosdpa import backends
from autosdpa.backends.torch_backends import torch_flags
from autosdpa.dispatch import dispatcher
from autosdpa.store import Store
from dispatch_helpers import FakeBackend, qkv, ran, seed_measurements


@pytest.mark.parametrize("grad", [False, True])
def test_value_of_another_length_on_a_cache_hit_raises(grad):
    """The fast key holds value's shape: a valid call must not let a k/v length mismatch through to the CPU
    flash kernel, which reads past v (garbage, or a heap abort with gradients)."""
    q = torch.randn(1, 2, 2, 96, dtype=torch.float64, requires_grad=grad)
    k = q.detach().clone().requires_grad_(grad)
    autosdpa.sdpa(q, k, k)
    with pytest.raises(RuntimeError):
        autosdpa.sdpa(q, k, torch.randn(1, 2, 3, 96, dtype=torch.float64, requires_grad=grad))


def test_value_of_another_length_with_a_warm_database_raises():
    q, k, v = qkv(L=8)
    seed_measurements(q, k, v, {"flash": 1e-5, "math": 2e-5})
    dispatcher.clear_plans()
    with pytest.raises(RuntimeError):
        autosdpa.sdpa(q, k, torch.randn(1, 2, 9, 8))


def test_a_degenerate_call_does_not_decide_for_normal_ones():
    q, k, v = qkv(L=64, D=16)
    odd = autosdpa.sdpa(q, k, v, is_causal=True, scale=0.0)
    torch.testing.assert_close(odd, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.0),
                               equal_nan=True)
    assert "scale=0.0" in autosdpa.explain(q, k, v, is_causal=True, scale=0.0).reason
    assert dispatcher.store().counts()["measurements"] == 0  # nothing measured, nothing stored
    d = autosdpa.explain(q, k, v, is_causal=True)
    assert d.backend == d.pytorch_choice == "flash" and "flash" not in d.rejected


@pytest.mark.parametrize("qs,ks", [((1, 2, 0, 8), (1, 2, 0, 8)), ((1, 2, 4, 8), (1, 2, 0, 8)),
                                   ((0, 2, 4, 8), (0, 2, 4, 8)), ((1, 2, 4, 0), (1, 2, 4, 0))],
                         ids=["no queries", "no keys", "no batch", "no head dim"])
def test_an_empty_call_is_quiet_and_matches(qs, ks):
    q, k = torch.randn(qs, requires_grad=True), torch.randn(ks, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = autosdpa.sdpa(q, k, k)
    ref = F.scaled_dot_product_attention(q, k, k)
    assert (out.shape, out.stride(), out.dtype, out.requires_grad) == (ref.shape, ref.stride(), ref.dtype,
                                                                       ref.requires_grad)
    torch.testing.assert_close(out, ref, equal_nan=True)  # e.g. no keys: every row fully masked


def test_invalid_heads_raise_pytorchs_error_quietly():
    q, k = torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError) as theirs:
        F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(type(theirs.value)):
            autosdpa.sdpa(q, k, k, enable_gqa=True)


def test_each_kind_of_failure_warns_once(monkeypatch):
    def broken(*a, **k):
        raise ValueError("planted")
    monkeypatch.setattr(backends.torch_backends, "pytorch_choice", broken)
    monkeypatch.setattr("autosdpa.forms.dense.pytorch_choice", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for L in (8, 9, 10):
            q, k, v = qkv(L=L)
            torch.testing.assert_close(autosdpa.sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v))
    msgs = [str(w.message) for w in caught if "autosdpa" in str(w.message)]
    assert len(msgs) == 1 and "ValueError: planted" in msgs[0]


@pytest.fixture
def liar():
    """A backend that returns zeros, and a shared file that claims it is the fastest."""
    b = backends.register(FakeBackend("liar", lambda q, k, v, *a: torch.zeros(*q.shape[:-1], v.shape[-1])))
    yield b
    backends.unregister("liar")


def _shared_file(tmp_path, q, k, v, times):
    path = tmp_path / "shared.sqlite"
    s = Store(str(path))
    seed_measurements(q, k, v, times, store=s)
    s.close()
    return path


def test_a_lying_shared_row_is_checked_and_rejected_locally(tmp_path, monkeypatch, liar, caplog):
    q, k, v = qkv(L=32)
    path = _shared_file(tmp_path, q, k, v, {"liar": 1e-9, "flash": 1e-3, "math": 2e-3})
    monkeypatch.setenv("AUTOSDPA_SHARED_DBS", str(path))
    autosdpa.reset()
    with caplog.at_level(logging.WARNING, logger="autosdpa"):
        out = autosdpa.sdpa(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    d = autosdpa.explain(q, k, v)
    assert d.backend == "flash" and "shared row" in d.rejected["liar"]
    # the rejection is the user's own row now: a new process does not trust the claim, nor run the check again
    autosdpa.reset()
    runs = liar.runs
    assert autosdpa.explain(q, k, v).backend == "flash"
    assert liar.runs == runs
    fp, _ = dispatcher.environments("cpu")["kernels"]
    assert Store(str(path), readonly=True).lookup_own(fp, d.problem)["liar"].ok  # the shared file is untouched


def test_an_honest_shared_row_is_checked_once_then_trusted(tmp_path, monkeypatch):
    q, k, v = qkv(L=40)
    path = _shared_file(tmp_path, q, k, v, {"flash": 2e-3, "math": 1e-3})
    monkeypatch.setenv("AUTOSDPA_SHARED_DBS", str(path))
    autosdpa.reset()
    assert ran(autosdpa.sdpa, q, k, v) == {"math"}
    d = autosdpa.explain(q, k, v)
    assert d.backend == "math" and d.source in ("database", "cache") and not {"math", "flash"} & set(d.rejected)


def test_threads_on_new_and_known_problems(caplog):
    """16 threads at once: each new problem tuned once, right results, no exceptions, flags untouched."""
    lengths = [8, 24, 40, 72]
    for L in lengths[:2]:  # known problems
        autosdpa.sdpa(*qkv(L=L))
    caplog.clear()
    errors = []
    barrier = threading.Barrier(16)

    def work(i):
        try:
            barrier.wait()
            for j in range(6):
                q, k, v = qkv(L=lengths[(i + j) % len(lengths)], seed=i)
                torch.testing.assert_close(autosdpa.sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v))
                if i == 0:  # one thread only: PyTorch's sdpa_kernel itself races another thread's sdpa_kernel
                    with sdpa_kernel([SDPBackend.MATH]):
                        F.scaled_dot_product_attention(q, k, v)
        except Exception as e:  # pragma: no cover - the assertion below reports it
            errors.append(e)

    with caplog.at_level(logging.INFO, logger="autosdpa"):
        threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    tuned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("autosdpa: tuning")]
    assert sorted(m.split()[2].split("|")[6] for m in tuned) == ["Lk=128", "Lk=64"]  # 40 -> 64, 72 -> 128
    assert torch_flags() == (True, True, True, True)


def test_forced_backend_under_threads_leaves_flags_alone():
    q = torch.randn(1, 2, 16, 8)
    stop = threading.Event()

    def ours():
        while not stop.is_set():
            with autosdpa.backend("math"):
                autosdpa.sdpa(q, q, q)

    t = threading.Thread(target=ours)
    t.start()
    try:
        for _ in range(100):  # the other thread's forced plan never changes what this thread's F.sdpa runs
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                assert ran(F.scaled_dot_product_attention, q, q, q) == {"flash"}
    finally:
        stop.set()
        t.join()
    assert torch_flags() == (True, True, True, True)


def test_fully_masked_rows_match_pytorch():
    q, k, v = qkv(L=8)
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[3] = False
    for _ in range(2):  # first sight, then the cached plan
        torch.testing.assert_close(autosdpa.sdpa(q, k, v, attn_mask=mask),
                                   F.scaled_dot_product_attention(q, k, v, attn_mask=mask), equal_nan=True)
