"""NestedTensor (jagged) calls end to end through autosdpa.sdpa: tuned once per problem, the winner runs,
the result equals the per-sequence reference, causal NJTs work (F.sdpa rejects them on the CPU)."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import autosdpa
from autosdpa import backends
from autosdpa.forms import jagged
from autosdpa.dispatch import dispatcher
from autosdpa.eligibility import ForcedBackendError

NJT = {"njt_pytorch", "njt_padded", "njt_split"}
pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")


def _qkv(lengths, heads=2, dim=8, grad=False, seed=0):
    """(B, H, ragged L, E) q, k, v over leaves (returned too) of (B, ragged L, H, E); k and v share offsets."""
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.nested.nested_tensor([torch.randn(n, heads, dim, generator=g) for n in lengths],
                                        layout=torch.jagged, requires_grad=grad) for _ in range(2)]
    leaves.append(torch.nested.nested_tensor_from_jagged(torch.randn(sum(lengths), heads, dim, generator=g),
                                                         leaves[1].offsets()).detach().requires_grad_(grad))
    return leaves, [t.transpose(1, 2) for t in leaves]


def _count_runs(monkeypatch):
    runs = []
    for name in NJT:
        b = backends.get(name)
        original = b.run

        def counted(*args, _name=name, _run=original, **kw):
            runs.append(_name)
            return _run(*args, **kw)
        monkeypatch.setattr(b, "run", counted)
    return runs


def test_tuned_once_then_the_winner_runs(monkeypatch):
    _, (q, k, v) = _qkv([5, 12, 3])
    decision = autosdpa.explain(q, k, v)
    assert decision.source == "tuned" and decision.backend in NJT
    assert "|layout=jagged|" in decision.problem and decision.problem.endswith("|tok=32")
    assert {n for n, t in decision.timings.items() if t is not None} == NJT  # every candidate measured
    assert not ({"math", "flash"} & (set(decision.rejected) | set(decision.timings)))  # not for this form
    runs = _count_runs(monkeypatch)
    out = autosdpa.sdpa(q, k, v)
    assert runs in ([decision.backend], [])  # [] when PyTorch's own NJT path won: F.sdpa itself runs
    if not runs:
        assert decision.backend == "njt_pytorch"
    assert out.offsets() is q.offsets() and jagged.max_error(out, F.scaled_dot_product_attention(q, k, v)) < 1e-5
    _, (q2, k2, v2) = _qkv([12, 7, 4], seed=1)  # other lengths, the same bucket: no new tuning
    assert autosdpa.explain(q2, k2, v2).source == "cache"
    out2 = autosdpa.sdpa(q2, k2, v2)
    assert jagged.max_error(out2, jagged.reference(jagged.make_call(q2, k2, v2))) < 1e-5
    assert list(dispatcher.measured_problems()) == [decision.problem]


def test_causal_njt_works_and_matches_the_reference():
    _, (q, k, v) = _qkv([5, 12, 3])
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = autosdpa.sdpa(q, k, v, is_causal=True)
    decision = autosdpa.explain(q, k, v, is_causal=True)
    assert decision.backend in NJT - {"njt_pytorch"} and "|causal|" in decision.problem
    assert "is_causal" in decision.rejected["njt_pytorch"]
    assert out.offsets() is q.offsets()
    assert jagged.max_error(out, jagged.reference(jagged.make_call(q, k, v, is_causal=True))) < 1e-5
    for o, a, b, c in zip(out.unbind(), q.unbind(), k.unbind(), v.unbind()):
        torch.testing.assert_close(o, F.scaled_dot_product_attention(a, b, c, is_causal=True))


def test_causal_training_gradients():
    leaves, (q, k, v) = _qkv([5, 12, 3], grad=True)
    out = autosdpa.sdpa(q, k, v, is_causal=True)
    decision = autosdpa.explain(q, k, v, is_causal=True)
    assert decision.problem.startswith("fwdbwd|") and decision.source in ("tuned", "cache")
    ref = jagged.reference(jagged.make_call(q, k, v, is_causal=True))
    gout = jagged.random_output(jagged.make_call(q, k, v))
    got = torch.autograd.grad(out, leaves, gout)
    want = torch.autograd.grad(ref, leaves, gout.double())
    for g, w in zip(got, want):
        assert jagged.max_error(g, w) < 1e-5


def test_overrides():
    _, (q, k, v) = _qkv([5, 12, 3])
    with autosdpa.backend("njt_split"):
        assert autosdpa.explain(q, k, v, is_causal=True).backend == "njt_split"
        out = autosdpa.sdpa(q, k, v, is_causal=True)
    assert jagged.max_error(out, jagged.reference(jagged.make_call(q, k, v, is_causal=True))) < 1e-5
    with autosdpa.backend("math"), pytest.raises(ForcedBackendError, match="NestedTensor"):
        autosdpa.sdpa(q, k, v)
    with autosdpa.backend("njt_padded"), pytest.raises(ForcedBackendError, match="NestedTensor"):
        autosdpa.sdpa(*(torch.randn(1, 2, 4, 8) for _ in range(3)))
    with autosdpa.mode("off"), pytest.raises(RuntimeError):
        autosdpa.sdpa(q, k, v, is_causal=True)  # plain F.sdpa
    with sdpa_kernel(SDPBackend.MATH):  # PyTorch's flags restrict to its own (dense) backends: PyTorch decides
        assert autosdpa.explain(q, k, v).source == "passthrough"
        assert jagged.max_error(autosdpa.sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v)) == 0


def test_offline_tuning_of_a_jagged_key_serves_later_calls(tmp_path):
    _, (q, k, v) = _qkv([20, 3, 9])
    key = jagged.problem_of(jagged.make_call(q, k, v, is_causal=True), 16).key
    [decision] = autosdpa.tune([key], progress=False)
    assert decision.problem == key and decision.backend in NJT
    autosdpa.reset()  # a new process: the measurements come from the database
    later = autosdpa.explain(q, k, v, is_causal=True)
    assert later.source == "database" and later.backend == decision.backend


def test_inputs_autosdpa_does_not_key_still_pass_through():
    (lq, lk, lv), _ = _qkv([5, 12, 3])
    out = autosdpa.sdpa(lq, lk, lv)  # ragged on dim 1: PyTorch's dense path over the heads
    assert autosdpa.explain(lq, lk, lv).source == "passthrough"
    torch.testing.assert_close(out.values(), F.scaled_dot_product_attention(lq, lk, lv).values())


@pytest.mark.gpu
def test_cuda_causal_njt_training_through_the_dispatcher():
    leaves, (q, k, v) = _qkv([5, 64, 3, 33], heads=4, dim=64, grad=True)
    leaves = [t.detach().to("cuda", torch.float16).requires_grad_() for t in leaves]
    q, k, v = (t.transpose(1, 2) for t in leaves)
    out = autosdpa.sdpa(q, k, v, is_causal=True)
    decision = autosdpa.explain(q, k, v, is_causal=True)
    assert decision.backend in NJT and decision.source in ("tuned", "cache")
    ref = jagged.reference(jagged.make_call(q, k, v, is_causal=True))
    assert jagged.max_error(out, ref) <= 1e-2
    gout = jagged.random_output(jagged.make_call(q, k, v))
    got = torch.autograd.grad(out, leaves, gout.half())
    want = torch.autograd.grad(ref, leaves, gout)
    for g, w in zip(got, want):
        assert jagged.max_error(g, w) <= 4e-2



def test_njt_rows_are_filed_under_the_torch_environment():
    """The NJT backends are made of PyTorch's ops: a Triton upgrade or a kernels edit must not retire their rows."""
    _, (q, k, v) = _qkv([5, 12, 3])
    key = autosdpa.explain(q, k, v).problem
    envs = dispatcher.environments(q.device)
    assert set(dispatcher.store().lookup_own(envs["torch"][0], key)) == NJT
    assert dispatcher.store().lookup_own(envs["kernels"][0], key) == {}
