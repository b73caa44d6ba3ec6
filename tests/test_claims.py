"""Claims from shared files are checked as local tuning checks a candidate: on the output, and on the
gradients when the call needs them (issue 17, item 8)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import autosdpa
from autosdpa import backends
from autosdpa.claims import check_claim
from autosdpa.dispatch import dispatcher
from autosdpa.backends import Call
from autosdpa.store import Store

from dispatch_helpers import FakeBackend, qkv, seed_measurements


def _right_forward_wrong_backward(q, k, v, *args):
    """F.sdpa's output exactly, with every gradient three times too large."""
    out = F.scaled_dot_product_attention(q, k, v)
    return out.detach() + (out - out.detach()) * 3


@pytest.fixture
def backward_liar():
    b = backends.register(FakeBackend("backward_liar", _right_forward_wrong_backward))
    yield b
    backends.unregister(b.name)


def _inputs(L=32):
    return tuple(t.requires_grad_() for t in qkv(L=L))


def test_check_claim_judges_gradients_when_the_call_needs_them(backward_liar):
    q, k, v = _inputs()
    assert check_claim(Call(q, k, v), backward_liar) is None  # forward only: right
    bad = check_claim(Call(q, k, v, needs_grad=True), backward_liar)
    assert bad is not None and bad.status == "rejected" and "gradients" in bad.detail
    assert bad.max_error is not None and bad.max_error > 0.1
    assert q.grad is None and k.grad is None  # the caller's tensors are only read


def test_a_shared_row_claiming_a_wrong_backward_is_rejected_and_never_trains(tmp_path, monkeypatch, backward_liar):
    q, k, v = _inputs()
    path = tmp_path / "shared.sqlite"
    s = Store(str(path))
    key = seed_measurements(q, k, v, {"backward_liar": 1e-9, "flash": 1e-3, "math": 2e-3}, store=s, needs_grad=True)
    s.close()
    assert key.startswith("fwdbwd|")
    monkeypatch.setenv("AUTOSDPA_SHARED_DBS", str(path))
    autosdpa.reset()
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    autosdpa.sdpa(q, k, v).backward(g)
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*ref).backward(g)
    for mine, want in zip((q, k, v), ref):
        torch.testing.assert_close(mine.grad, want.grad)
    assert backward_liar.runs == 1  # its check, and nothing else
    d = autosdpa.explain(q, k, v)
    assert d.problem == key and d.backend != "backward_liar" and "gradients" in d.rejected["backward_liar"]
    autosdpa.reset()  # the rejection is the user's own row: a new process trusts neither the claim nor re-checks
    assert autosdpa.explain(q, k, v).backend != "backward_liar" and backward_liar.runs == 1
    fp = dispatcher.environments("cpu")["kernels"][0]
    assert dispatcher.store().lookup_own(fp, key)["backward_liar"].status == "rejected"
