"""Masks with structure: recognised from their values on the CPU (never stale), carried by mask objects
(provenance, no values read), and run by rewrites that give F.sdpa's result."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import autosdpa
from autosdpa.backends import get
from autosdpa.backends.base import Call
from autosdpa.dispatch import Dispatcher, dispatcher
from autosdpa.forms import structure as fs
from autosdpa.masks import StructuredMask, key_padding
from autosdpa.problem import Problem

B, H, L, D = 4, 2, 96, 16  # L * L >= the dispatcher's threshold for looking at a mask
LENS = (96, 60, 23, 0)     # one full sequence, two padded, one empty (every row of it fully masked)


def _qkv(lq=L, lk=L, seed=0, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, lq, D, generator=g).to(dtype)
    k, v = (torch.randn(B, H, lk, D, generator=g).to(dtype) for _ in range(2))
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v


def _keep(word, lens=LENS, lq=L, lk=L):
    """The kept positions of each structure, written out independently of forms.structure."""
    i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    n = torch.tensor(lens)[:, None, None, None]
    return {"all": torch.ones(1, 1, 1, lk, dtype=torch.bool),
            "causal": (j <= i)[None, None],
            "causal_br": (j <= i + lk - lq)[None, None],
            "kpad_r": j[None, None] < n,
            "kpad_l": j[None, None] >= lk - n,
            "cpad_r": (j <= i)[None, None] & (j[None, None] < n),
            "cpad_l": (j <= i)[None, None] & (j[None, None] >= lk - n)}[word]


def _as(keep, kind):
    if kind == "bool":
        return keep
    return torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))


SHAPES = {"all": (L, L), "causal": (L, L), "causal_br": (L // 2, L)}
WORDS = fs.KINDS


# -- recognising ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("word", WORDS)
def test_each_structure_is_recognised(word, kind):
    lq = L // 2 if word == "causal_br" else L
    q, k, _ = _qkv(lq=lq)
    m = _as(_keep(word, lq=lq), kind)
    s = fs.detect(m, q, k)
    assert s is not None and s.word == word
    if s.padded:
        assert s.lengths == LENS


@pytest.mark.parametrize("layout", ["2-D", "3-D", "(B,1,1,Lk)", "expanded to every head", "strided view"])
def test_mask_layouts_that_broadcast_alike_are_recognised(layout):
    q, k, _ = _qkv()
    if layout == "2-D":
        m, want = _keep("causal")[0, 0], "causal"
    elif layout == "3-D":
        m, want = _keep("causal")[0], "causal"
    elif layout == "(B,1,1,Lk)":
        m, want = _keep("kpad_r")[:, :, :1], "kpad_r"
    elif layout == "expanded to every head":
        m, want = _keep("cpad_l").expand(B, H, L, L), "cpad_l"
    else:
        m, want = torch.zeros(B, 1, L, 2 * L, dtype=torch.bool)[..., ::2], "cpad_r"
        m.copy_(_keep("cpad_r"))
    assert fs.detect(m, q, k).word == want


@pytest.mark.parametrize("value", [-10000.0, torch.finfo(torch.float32).min, 1.0])
def test_float_masks_other_than_zero_and_minus_inf_have_no_structure(value):
    """-10000 or finfo.min are not -inf: on a fully masked row they give a mean of v, not F.sdpa's 0."""
    q, k, _ = _qkv()
    m = torch.zeros(B, 1, L, L).masked_fill(~_keep("cpad_r"), value)
    assert fs.detect(m, q, k) is None


@pytest.mark.parametrize("where", ["first row", "a middle row", "last row", "a middle column"])
def test_one_wrong_element_anywhere_means_no_structure(where):
    q, k, _ = _qkv()
    m = _keep("cpad_r").clone()
    b, i, j = {"first row": (0, 0, 5), "a middle row": (1, 40, 3), "last row": (2, L - 1, 50),
               "a middle column": (0, 70, 35)}[where]
    m[b, 0, i, j] = ~m[b, 0, i, j]
    assert fs.detect(m, q, k) is None


def test_masks_it_must_not_read_have_no_structure():
    q, k, _ = _qkv()
    per_head = _keep("causal").expand(B, H, L, L).clone()
    assert fs.detect(per_head, q, k) is None  # real per-head masks (one structure each) are not looked at
    assert fs.detect(_keep("causal").to("meta"), q, k) is None
    assert fs.detect(torch.rand(B, 1, L, L) > 0.5, q, k) is None
    assert fs.detect(_as(_keep("causal"), "float").requires_grad_(), q, k) is None


# -- rewrites ---------------------------------------------------------------------------------------------------------

REWRITES = {"all": ["mask_none"], "causal": ["mask_causal"], "causal_br": ["mask_causal"],
            **{w: ["mask_split", "mask_trim"] for w in fs.PADDED}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("word,backend", [(w, b) for w in WORDS for b in REWRITES[w]])
def test_rewrites_give_sdpas_result(word, backend, dtype):
    """Values and gradients as F.sdpa's with the dense mask: all/causal bit-identical, padded within an ulp
    or two; fully masked rows exactly F.sdpa's (0 here) and their gradients too."""
    lq = L // 2 if word == "causal_br" else L
    q, k, v = _qkv(lq=lq, dtype=dtype, grad=True)
    m = _keep(word, lq=lq)
    be = get(backend)
    ours = be.run(q, k, v, m)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    if be.tolerance == "bit-identical":
        assert torch.equal(ours, theirs)
    else:
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(ours, theirs, atol=4 * ulp, rtol=4 * ulp)
    dead = ~m.expand(B, 1, lq, L).any(-1)  # fully masked query rows
    assert torch.equal(ours.detach().masked_select(dead[..., None]), theirs.detach().masked_select(dead[..., None]))
    g = torch.randn_like(theirs)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(theirs, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-5 if dtype is torch.float32 else 1e-10, rtol=1e-5)


def test_rewrites_keep_grouped_query_attention():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 4, L, D, generator=g)
    k, v = (torch.randn(B, 2, L, D, generator=g) for _ in range(2))
    m = _keep("cpad_r")
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
    for name in ("mask_split", "mask_trim"):
        torch.testing.assert_close(get(name).run(q, k, v, m, enable_gqa=True), want, atol=1e-6, rtol=1e-6)


def test_a_rewrite_refuses_a_mask_it_does_not_rewrite():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="not one it rewrites"):
        get("mask_split").run(q, k, v, torch.rand(B, 1, L, L) > 0.5)
    call = Call(q, k, v, _keep("causal"), structure=fs.Structure("causal", (), L, L))
    assert get("mask_split").not_supported_reasons(call) == ["rewrites kpad_r, kpad_l, cpad_r, cpad_l masks, "
                                                             "not causal"]
    assert get("mask_causal").not_supported_reasons(call) == []


# -- never stale ------------------------------------------------------------------------------------------------------

def _change(how, m):
    """Turn the cpad_r mask ``m`` into an unstructured one, in the way named."""
    if how == "in place":
        m[1, 0, 40, 3] = ~m[1, 0, 40, 3]
    elif how == ".data":
        m.data[1, 0, 40, 3] = ~m.data[1, 0, 40, 3]
    elif how == "numpy view":
        a = m.numpy()
        a[1, 0, 40, 3] = not a[1, 0, 40, 3]
    elif how == "set_":
        other = m.clone()
        other[1, 0, 40, 3] = ~other[1, 0, 40, 3]
        m.set_(other.untyped_storage(), 0, other.shape, other.stride())
    return m


@pytest.mark.parametrize("how", ["in place", ".data", "numpy view", "set_"])
def test_a_mask_changed_between_calls_is_never_served_a_stale_structure(how):
    q, k, v = _qkv()
    m = _keep("cpad_r").clone()
    with autosdpa.backend("mask_split", "flash", "math"):
        for _ in range(2):  # decided (mask_split wins, forced among these) and served
            torch.testing.assert_close(autosdpa.sdpa(q, k, v, attn_mask=m),
                                       F.scaled_dot_product_attention(q, k, v, attn_mask=m), atol=1e-6, rtol=1e-6)
        version = m._version
        _change(how, m)
        if how in (".data", "numpy view"):
            assert m._version == version  # the version counter did not see it: only the values tell
        ours = autosdpa.sdpa(q, k, v, attn_mask=m)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=m), atol=1e-6, rtol=1e-6)


def test_inference_tensors_are_read_every_call():
    q, k, v = _qkv()
    with torch.inference_mode():
        m = _keep("kpad_r").clone()
        a = autosdpa.sdpa(q, k, v, attn_mask=m)
        m[2, 0, 0, 70] = True  # a longer sequence, now unstructured
        b = autosdpa.sdpa(q, k, v, attn_mask=m)
        torch.testing.assert_close(a, F.scaled_dot_product_attention(q, k, v, attn_mask=_keep("kpad_r")))
        torch.testing.assert_close(b, F.scaled_dot_product_attention(q, k, v, attn_mask=m))


# -- the dispatcher ---------------------------------------------------------------------------------------------------

def test_the_structure_is_part_of_the_problem_key_and_explained():
    q, k, v = _qkv()
    causal, random = fs.detect(_keep("causal"), q, k), None
    keys = {Problem.from_call(Call(q, k, v, _keep("causal")[0, 0], structure=s)).key for s in (causal, random)}
    assert len(keys) == 2
    d = autosdpa.explain(q, k, v, attn_mask=_keep("cpad_r"))
    assert "struct=cpad_r|fill=" in d.problem
    assert "the mask is causal + right padding" in d.reason and d.backend in d.timings
    assert set(d.timings) >= {"mask_split", "mask_trim"}
    plain = autosdpa.explain(q, k, v, attn_mask=torch.rand(B, 1, L, L) > 0.5)
    assert "struct=" not in plain.problem
    # backends that cannot take this form of call are not listed at all (not even as rejected)
    assert not any(n.startswith(("mask_", "njt_")) for n in {**plain.timings, **plain.rejected})


def test_each_structure_is_decided_once_and_new_lengths_decide_nothing(monkeypatch):
    decisions = []
    real = Dispatcher.decide
    monkeypatch.setattr(Dispatcher, "decide", lambda self, call, policy, **kw: (
        decisions.append(Problem.from_call(call).key), real(self, call, policy, **kw))[1])
    q, k, v = _qkv()
    for lens in ((96, 60, 23, 0), (96, 50, 30, 0), (90, 80, 10, 1)):  # new lengths, the same share of keys
        m = _keep("cpad_r", lens)
        torch.testing.assert_close(autosdpa.sdpa(q, k, v, attn_mask=m),
                                   F.scaled_dot_product_attention(q, k, v, attn_mask=m), atol=1e-6, rtol=1e-6)
    assert len(decisions) == 1 and "struct=cpad_r|fill=2" in decisions[0]
    m = _keep("cpad_l", (96, 96, 96, 80))  # another structure: decided once more
    autosdpa.sdpa(q, k, v, attn_mask=m)
    autosdpa.sdpa(q, k, v, attn_mask=m)
    assert len(decisions) == 2 and "struct=cpad_l|fill=4" in decisions[1]


def test_unstructured_masks_stop_being_looked_at():
    from autosdpa.plans import Router

    q, k, v = _qkv()
    for seed in range(5):
        m = torch.rand(B, 1, L, L, generator=torch.Generator().manual_seed(seed)) > 0.3
        torch.testing.assert_close(autosdpa.sdpa(q, k, v, attn_mask=m), F.scaled_dot_product_attention(
            q, k, v, attn_mask=m))
    assert not any(isinstance(p, Router) for p in dispatcher.cached_plans())


def test_small_calls_are_not_looked_at():
    from autosdpa.plans import Router

    q = torch.randn(1, 1, 8, 8)
    autosdpa.sdpa(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool).tril())
    assert not any(isinstance(p, Router) for p in dispatcher.cached_plans())


# -- mask objects -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal,side", list(itertools.product([False, True], ["right", "left"])))
def test_mask_objects_stand_for_their_dense_mask(causal, side):
    q, k, v = _qkv()
    m = key_padding(LENS, L, L, causal=causal, side=side)
    word = ("cpad_" if causal else "kpad_") + side[0]
    assert torch.equal(m.materialize(), _keep(word).expand(B, 1, L, L))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=_keep(word))
    assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=m), dense)  # plain F.sdpa
    torch.testing.assert_close(autosdpa.sdpa(q, k, v, attn_mask=m), dense, atol=1e-6, rtol=1e-6)


def test_mask_objects_are_never_read(monkeypatch):
    """Structure from provenance: no value of a mask object is ever looked at (on CUDA that would sync)."""
    monkeypatch.setattr(fs, "detect", lambda *a: pytest.fail("a mask object's values were read"))
    monkeypatch.setattr("autosdpa.plans.detect", fs.detect)
    monkeypatch.setattr("autosdpa.forms.rewrites.detect", fs.detect)
    q, k, v = _qkv()
    for lens in (LENS, (96, 96, 50, 50)):
        m = key_padding(lens, L, L, causal=True)
        torch.testing.assert_close(autosdpa.sdpa(q, k, v, attn_mask=m),
                                   F.scaled_dot_product_attention(q, k, v, attn_mask=m.materialize()),
                                   atol=1e-6, rtol=1e-6)
    assert "struct=cpad_r" in autosdpa.explain(q, k, v, attn_mask=m).problem


def test_mask_object_arguments_are_checked():
    with pytest.raises(ValueError, match="lengths"):
        key_padding([5, 200], 8, 100)
    with pytest.raises(ValueError, match="lq == lk"):
        key_padding([5], 4, 8, causal=True)
    with pytest.raises(ValueError, match="side"):
        key_padding([5], 8, 8, side="middle")
    assert key_padding([8, 8], 8, 8).structure.word == "all"
    assert key_padding(torch.tensor([8, 8]), 8, 8, causal=True).structure.word == "causal"
    assert isinstance(key_padding([3], 8, 8), StructuredMask)


def test_the_compiled_op_keeps_the_result(monkeypatch):
    torch._dynamo.reset()
    q, k, v = _qkv()
    m = _keep("cpad_r")

    def f(q, k, v, m):
        return autosdpa.sdpa(q, k, v, attn_mask=m)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for lens in (LENS, (96, 96, 50, 1)):
        for m in (_keep("cpad_r", lens), key_padding(lens, L, L, causal=True)):  # a mask object: materialised
            dense = m.materialize() if isinstance(m, StructuredMask) else m
            torch.testing.assert_close(compiled(q, k, v, m), F.scaled_dot_product_attention(
                q, k, v, attn_mask=dense), atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()


def test_a_structured_problem_tunes_offline_and_serves_later_calls():
    """`autosdpa tune --shape ...,struct=cpad_r` tunes on a synthetic mask of that structure and fill; a later
    call with such a mask finds the decision (a new process: from the database)."""
    from autosdpa.workload import parse_shape

    p = parse_shape(f"b={B},hq={H},lq={L},d={D},struct=cpad_r,fill=2")
    assert p.key.endswith("|struct=cpad_r|fill=2") and Problem.parse(p.key) == p
    [decision] = autosdpa.tune([p.key.replace(f"Lq={L}|Lk={L}", "Lq=128|Lk=128")], progress=False)
    assert decision.backend in decision.timings and "struct=cpad_r|fill=2" in decision.problem
    autosdpa.reset()
    q, k, v = _qkv()
    later = autosdpa.explain(q, k, v, attn_mask=_keep("cpad_r"))
    assert later.source == "database" and later.problem == decision.problem
