"""NestedTensor (jagged) calls: each njt_* backend against the per-sequence dense reference and against F.sdpa
where PyTorch takes the call (values, NJT structure, gradients); causal and GQA NJTs; eligibility; keys."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from autosdpa import backends
from autosdpa.forms import jagged
from autosdpa.backends.base import Call
from autosdpa.eligibility import form_reasons
from autosdpa.problem import Problem
from autosdpa.reference import TOLERANCE

NJT = ["njt_pytorch", "njt_padded", "njt_split"]
COMPOSED = ["njt_padded", "njt_split"]
# (query lengths, key lengths): ragged self-attention, equal lengths, cross-attention with other lengths,
# ragged queries over keys of one length (no padding mask needed, even causal)
LENGTHS = {"ragged": ([5, 12, 3], None), "uniform": ([4, 4], None), "cross": ([5, 1, 7], [3, 9, 7]),
           "even_keys": ([5, 1, 7], [6, 6, 6])}

# PyTorch's CPU NJT path converts to the older nested layout internally, which warns that it is a prototype.
pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")


def _leaf(lengths, heads, dim, dtype=torch.float32, seed=0, grad=False):
    """A leaf (B, ragged L, H, E) NJT, as projections of a token batch give."""
    g = torch.Generator().manual_seed(seed)
    return torch.nested.nested_tensor([torch.randn(n, heads, dim, generator=g) for n in lengths],
                                      layout=torch.jagged, dtype=dtype, requires_grad=grad)


def _qkv(q_lens, k_lens=None, hq=4, hkv=None, d=8, dv=None, dtype=torch.float32, grad=False):
    """Leaves (for gradients) and the (B, H, ragged L, E) views attention takes; k and v share offsets."""
    k_lens = q_lens if k_lens is None else k_lens
    lq = _leaf(q_lens, hq, d, dtype, 1, grad)
    lk = _leaf(k_lens, hkv or hq, d, dtype, 2, grad)
    lv = torch.nested.nested_tensor_from_jagged(
        torch.randn(sum(k_lens), hkv or hq, dv or d, generator=torch.Generator().manual_seed(3)).to(dtype),
        lk.offsets()).detach().requires_grad_(grad)
    return (lq, lk, lv), (lq.transpose(1, 2), lk.transpose(1, 2), lv.transpose(1, 2))


def _run(name, q, k, v, **kw):
    return backends.get(name).run(q, k, v, None, kw.get("dropout_p", 0.0), kw.get("is_causal", False),
                                  kw.get("scale"), kw.get("enable_gqa", False))


def _per_sequence(q, k, v, **kw):
    """F.sdpa on each sequence alone, as dense (H, L, E) tensors."""
    return [F.scaled_dot_product_attention(a, b, c, **kw) for a, b, c in zip(q.unbind(), k.unbind(), v.unbind())]


def _assert_structure(out, like):
    """The structure F.sdpa gives NJT outputs: jagged, the query's offsets (so its ragged size), ragged on dim
    2, over a (tokens, H, Ev)-contiguous buffer."""
    assert out.is_nested and out.layout == torch.jagged and out.dtype == like.dtype
    assert out.offsets() is like.offsets() and out.lengths() is None
    assert out.shape[:3] == like.shape[:3] and out.dim() == 4
    assert out.transpose(1, 2).values().is_contiguous()


@pytest.mark.parametrize("case", LENGTHS)
@pytest.mark.parametrize("name", NJT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_equal_f_sdpa_and_the_reference(name, case, dtype):
    _, (q, k, v) = _qkv(*LENGTHS[case], dv=6, dtype=dtype)
    call = jagged.make_call(q, k, v)
    assert backends.get(name).not_supported_reasons(call) == []
    out, expected = _run(name, q, k, v), F.scaled_dot_product_attention(q, k, v)
    _assert_structure(out, q)
    assert out.shape == expected.shape and out.stride() == expected.stride()
    assert out.values().stride() == expected.values().stride()
    tol = TOLERANCE[dtype]
    assert jagged.max_error(out, expected) <= tol
    assert jagged.max_error(out, jagged.reference(call)) <= tol
    for o, e in zip(out.unbind(), _per_sequence(q, k, v)):
        torch.testing.assert_close(o, e, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", NJT)
def test_gradients_equal_f_sdpa(name):
    leaves, (q, k, v) = _qkv([5, 12, 3], [2, 6, 3], grad=True)
    gout = jagged.random_output(jagged.make_call(q, k, v))
    want = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), leaves, gout)
    got = torch.autograd.grad(_run(name, q, k, v), leaves, gout)
    for g, w, leaf in zip(got, want, leaves):
        assert g.offsets() is leaf.offsets()
        torch.testing.assert_close(g.values(), w.values(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", LENGTHS)
@pytest.mark.parametrize("name", COMPOSED)
def test_causal_is_top_left_per_sequence(name, case):
    """PyTorch's CPU NJT path rejects is_causal; the compositions give each sequence dense is_causal."""
    leaves, (q, k, v) = _qkv(*LENGTHS[case], grad=True)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = _run(name, q, k, v, is_causal=True)
    _assert_structure(out, q)
    for o, e in zip(out.unbind(), _per_sequence(q, k, v, is_causal=True)):
        torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5)
    call = jagged.make_call(q, k, v, is_causal=True)
    assert call.causal == "top_left"
    ref = jagged.reference(call)
    assert jagged.max_error(out, ref) <= 1e-5
    gout = jagged.random_output(call)
    got = torch.autograd.grad(out, leaves, gout)
    want = torch.autograd.grad(ref, leaves, gout.to(ref.dtype))
    for g, w in zip(got, want):
        assert jagged.max_error(g, w) <= 1e-5


def test_causal_differs_from_non_causal():
    """A causal mask that does nothing (e.g. bottom-right or padding-only) would pass a weak check."""
    _, (q, k, v) = _qkv([6, 3])
    for name in COMPOSED:
        assert jagged.max_error(_run(name, q, k, v, is_causal=True), _run(name, q, k, v)) > 1e-2


@pytest.mark.parametrize("name", COMPOSED)
def test_gqa(name):
    """PyTorch's NJT attention has no GQA (it raises); the compositions repeat key/value heads as dense GQA."""
    leaves, (q, k, v) = _qkv([5, 2, 7], hq=4, hkv=2, grad=True)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    call = jagged.make_call(q, k, v, is_causal=True, enable_gqa=True)
    assert call is not None
    assert "query heads" in " ".join(backends.get("njt_pytorch").not_supported_reasons(call))
    out = _run(name, q, k, v, is_causal=True, enable_gqa=True)
    assert out.shape[1] == 4 and jagged.max_error(out, jagged.reference(call)) <= 1e-5
    for o, e in zip(out.unbind(), _per_sequence(q, k, v, is_causal=True, enable_gqa=True)):
        torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5)
    assert all(g is not None for g in torch.autograd.grad(out.values().sum(), leaves))


@pytest.mark.parametrize("name", NJT)
def test_scale_and_dropout(name):
    _, (q, k, v) = _qkv([5, 12, 3])
    out = _run(name, q, k, v, scale=0.3)
    assert jagged.max_error(out, F.scaled_dot_product_attention(q, k, v, scale=0.3)) <= 1e-5
    dropped = _run(name, q, k, v, dropout_p=0.5)
    _assert_structure(dropped, q)
    assert bool(torch.isfinite(dropped.values()).all()) and jagged.max_error(dropped, out) > 1e-3


def test_eligibility_reasons():
    _, (q, k, v) = _qkv([5, 12, 3])
    call = jagged.make_call(q, k, v)
    for b in backends.all_backends():
        reasons = form_reasons(call, b)
        if b.name in NJT:
            assert reasons == [] and b.not_supported_reasons(call) == []
        else:  # PyTorch's math backend would itself accept the call: the layout check must rule it out
            assert reasons and "NestedTensor" in reasons[0]
    causal = jagged.make_call(q, k, v, is_causal=True)
    assert "is_causal" in " ".join(backends.get("njt_pytorch").not_supported_reasons(causal))
    assert jagged.pytorch_choice(call) == "njt_pytorch" and jagged.pytorch_choice(causal) is None
    dense = Call(*(torch.randn(1, 2, 4, 8) for _ in range(3)))
    for name in NJT:
        assert "NestedTensor" in backends.get(name).not_supported_reasons(dense)[0]
        assert form_reasons(dense, backends.get(name)) == ["takes only NestedTensor (jagged layout) inputs"]


def test_make_call_leaves_other_inputs_to_pytorch():
    (lq, lk, lv), (q, k, v) = _qkv([5, 12, 3], [2, 2, 2])
    assert jagged.make_call(q, k, v) is not None
    assert jagged.make_call(q, k, v, attn_mask=torch.ones(2, 2, dtype=torch.bool)) is None  # PyTorch: ValueError
    assert jagged.make_call(lq, lk, lv) is None  # ragged on dim 1: PyTorch's dense path over heads
    assert jagged.make_call(q, k.values().unsqueeze(0), v) is None  # mixed nested and dense
    other_v = _leaf([3, 3, 3], 4, 8).transpose(1, 2)
    assert jagged.make_call(q, k, other_v) is None  # key and value lengths differ
    holes = torch.nested.narrow(torch.randn(3, 6, 4, 8), 1, torch.tensor([0, 1, 2]), torch.tensor([3, 4, 2]),
                                layout=torch.jagged).transpose(1, 2)
    assert holes.lengths() is not None and jagged.make_call(holes, holes, holes) is None
    from autosdpa import forms  # the plain arguments are checked once, for dense and jagged calls alike

    assert forms.make_call(q, k, v, is_causal=1) is None and forms.make_call(q, k, v, scale="x") is None
    _, (q8, k2, v2) = _qkv([5, 12, 3], hq=4, hkv=3)
    assert jagged.make_call(q8, k2, v2, enable_gqa=True) is None  # 4 heads are no multiple of 3
    assert jagged.make_call(q, k, v).needs_grad is False


def test_degenerate_calls_decide_nothing():
    _, (q, k, v) = _qkv([5, 0, 3])
    assert jagged.degenerate_reason(jagged.make_call(q, k, v)) == "a sequence of length 0"
    _, (q, k, v) = _qkv([5, 12, 3])
    assert jagged.degenerate_reason(jagged.make_call(q, k, v)) is None
    assert jagged.degenerate_reason(jagged.make_call(q, k, v, scale=0.0)) == "scale=0.0"


def test_key_buckets_and_round_trips():
    leaves, (q, k, v) = _qkv([5, 40, 3] + [7] * 17, [2] * 20, hq=4, hkv=2, d=8, dv=6, grad=True)
    call = jagged.make_call(q, k, v, is_causal=True, enable_gqa=True)
    p = jagged.problem_of(call, threshold=16)
    assert (p.layout, p.batch, p.lq, p.lk, p.tokens) == ("jagged", 32, 64, 2, 256)  # 20, 40, 2, 167 bucketed
    assert (p.hq, p.hkv, p.d, p.dv, p.causal, p.gqa, p.train, p.mask) == (4, 2, 8, 6, "top_left", True, True,
                                                                          "none")
    assert p.key.endswith("|layout=jagged|det=0|tok=256")
    assert Problem.parse(p.key) == p
    assert jagged.problem_of(call, threshold=None).tokens == 167


@pytest.mark.parametrize("key", [
    "fwd|fp32|B=3|Hq=4|Hkv=4|Lq=12|Lk=16|D=8|Dv=8|nocausal|mask=none|drop=0|gqa=0|layout=jagged|det=0|tok=16",
    "fwdbwd|bf16|B=32|Hq=2|Hkv=1|Lq=32|Lk=64|D=8|Dv=4|causal|mask=none|drop=0|gqa=1|layout=jagged|det=0|tok=64",
    "fwd|fp32|B=8|Hq=2|Hkv=2|Lq=1|Lk=32|D=8|Dv=8|causal|mask=none|drop=0|gqa=0|layout=jagged|det=0|tok=8",
])
def test_synthetic_inputs_have_the_problem_key(key):
    p = Problem.parse(key)
    call = jagged.synthetic_call(p, "cpu", seed=1)
    assert call.needs_grad == p.train and call.query.requires_grad == p.train
    assert jagged.problem_of(call, threshold=16) == p
    assert jagged.degenerate_reason(call) is None
    out = _run("njt_split", call.query, call.key, call.value, is_causal=call.is_causal, enable_gqa=call.enable_gqa)
    assert jagged.max_error(out, jagged.reference(call)) <= TOLERANCE[call.query.dtype]


def test_synthetic_lengths_when_the_bucketed_values_do_not_fit():
    """Bucketing rounds each value up on its own: 3 sequences of at most 7 tokens cannot hold 32 (from 21),
    3 of 32 tokens in all cannot have one of 32 (from 20, 3, 9). The synthetic batch still has the key."""
    p = Problem(batch=3, hq=1, hkv=1, lq=7, lk=7, d=8, dv=8, layout="jagged", tokens=32)
    assert jagged.synthetic_call(p).query.offsets().tolist() == [0, 7, 14, 21]
    p = p.with_(lq=32, lk=32)
    call = jagged.synthetic_call(p)
    assert call.query.offsets().tolist() == [0, 30, 31, 32] and jagged.problem_of(call) == p


def test_reference_and_max_error():
    _, (q, k, v) = _qkv([5, 12, 3])
    call = jagged.make_call(q, k, v)
    ref = jagged.reference(call)
    assert ref.dtype == torch.float64 and ref.offsets() is q.offsets()
    for r, e in zip(ref.unbind(), _per_sequence(*(t.double() for t in (q, k, v)))):
        torch.testing.assert_close(r, e)
    assert jagged.max_error(ref, ref) == 0.0
    shifted = _leaf([6, 11, 3], 4, 8).transpose(1, 2)  # same tokens and batch, other lengths
    assert jagged.max_error(shifted, ref) == math.inf
    assert jagged.max_error(ref.values(), ref) == math.inf
    wrong = jagged.like_query(ref.transpose(1, 2).values() + 0.5, q)
    assert 0.1 < jagged.max_error(wrong, ref) < math.inf
    with pytest.raises(RuntimeError):
        jagged.reference(Call(q, k, v.transpose(1, 2)))



@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_pytorch_kernels_take_njt(backend, causal):
    """On CUDA PyTorch's NJT attention runs flash / efficient / cuDNN: njt_pytorch is eligible where PyTorch's
    checks say so (flash and efficient at least without causal), and then equals the reference, as do the
    compositions always."""
    _, (q, k, v) = _qkv([5, 12, 3, 64], hq=4, d=64, dtype=torch.float16)
    q, k, v = (t.to("cuda") for t in (q, k, v))
    call = jagged.make_call(q, k, v, is_causal=causal)
    ref = jagged.reference(call)
    with sdpa_kernel(getattr(SDPBackend, backend)):
        reasons = backends.get("njt_pytorch").not_supported_reasons(call)
        if backend != "CUDNN_ATTENTION" and not causal:
            assert reasons == []
        if not reasons:
            out = _run("njt_pytorch", q, k, v, is_causal=causal)
            _assert_structure(out, q)
            assert jagged.max_error(out, ref) <= 1e-2
    for name in COMPOSED:
        got = _run(name, q, k, v, is_causal=causal)
        _assert_structure(got, q)
        assert jagged.max_error(got, ref) <= 1e-2


def test_bucket_key_groups_batches_of_one_problem():
    def key(q_lens, k_lens=None, **kw):
        _, (q, k, v) = _qkv(q_lens, k_lens, **kw)
        fk = (q.shape, k.shape, v.shape, q.dtype, -1, None, 0.0, True, False, False)
        return jagged.bucket_key(fk, q, k, v, None, 16), jagged.problem_of(jagged.make_call(q, k, v), 16)
    (a, pa), (b, pb), (c, pc) = key([20, 3, 9]), key([30, 1, 1]), key([20, 3, 9, 1])
    assert pa == pb and a == b and hash(a) == hash(b)  # other lengths, same bucket: batch, Lq and tokens
    assert pc != pa and c != a
    assert key([20, 3, 9], [5, 5, 5])[0] != a and key([20, 3, 9], hq=8)[0] != a
    assert key([20, 0, 9])[0] is None  # a sequence of length 0 never shares a plan
    holes = torch.nested.narrow(torch.randn(2, 6, 4, 8), 1, torch.tensor([0, 1]), torch.tensor([3, 4]),
                                layout=torch.jagged).transpose(1, 2)
    assert jagged.bucket_key((), holes, holes, holes, None, 16) is None
