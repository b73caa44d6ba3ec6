"""torch.compile follows the tuned decision (the custom op autosdpa::sdpa), TorchScript gets PyTorch's own op."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import autosdpa
from autosdpa.dispatch import dispatcher
from dispatch_helpers import qkv, ran, seed_measurements


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def attn(q, k, v):
    return autosdpa.sdpa(q, k, v, is_causal=True) * 2


def test_compiled_graph_runs_the_measured_winner():
    q, k, v = qkv(L=64, D=16)
    seed_measurements(q, k, v, {"flash": 2e-3, "math": 1e-3}, is_causal=True)  # math measured 2x faster
    compiled = torch.compile(attn, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v)
    assert ran(compiled, q, k, v) == {"math"}  # not PyTorch's own pick (flash)
    torch.testing.assert_close(out, attn(q, k, v))
    assert autosdpa.explain(q, k, v, is_causal=True).backend == "math"


def test_opt_out_compiles_plain_sdpa(monkeypatch):
    q, k, v = qkv(L=64, D=16)
    seed_measurements(q, k, v, {"flash": 2e-3, "math": 1e-3}, is_causal=True)
    monkeypatch.setenv("AUTOSDPA_COMPILE", "pytorch")
    autosdpa.reset()
    compiled = torch.compile(attn, backend="aot_eager", fullgraph=True)
    assert ran(compiled, q, k, v) == {"flash"}


def test_gradients_match_eager():
    q, k, v = (t.requires_grad_() for t in qkv(L=32, D=16))
    compiled = torch.compile(attn, backend="aot_eager", fullgraph=True)
    g_c = torch.autograd.grad(compiled(q, k, v).square().sum(), (q, k, v))
    g_e = torch.autograd.grad(attn(q, k, v).square().sum(), (q, k, v))
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


def test_dynamic_lengths_compile_once():
    compiled = torch.compile(attn, backend="aot_eager", dynamic=True, fullgraph=True)
    for L in (17, 23, 40, 77, 130):  # (a length equal to D would let duck sizing specialise, ours or not)
        q, k, v = qkv(L=L, D=16)
        torch.testing.assert_close(compiled(q, k, v), attn(q, k, v))
    assert counters["stats"]["unique_graphs"] == 1


def test_no_tuning_while_tracing_and_the_op_tunes_at_run_time():
    q, k, v = qkv(L=48, D=16)
    graphs = []

    def trace_only(gm, example_inputs):  # records the graph, never runs it
        graphs.append(gm)
        return lambda *args: (torch.zeros_like(q),)
    torch.compile(attn, backend=trace_only, fullgraph=True)(q, k, v)
    assert graphs and dispatcher.measured_problems() == {}  # tracing decided nothing
    assert "autosdpa.sdpa" in str(graphs[0].graph)
    torch.compile(attn, backend="aot_eager", fullgraph=True)(q, k, v)
    assert any(key.startswith("fwd|fp32") for key in dispatcher.measured_problems())  # measured when run


@pytest.mark.parametrize("kw", [dict(dropout_p=0.0, attn_mask="bool"), dict(enable_gqa=True)])
def test_masks_and_gqa_in_graphs(kw):
    q = torch.randn(2, 4, 24, 16)
    k = torch.randn(2, 2 if kw.get("enable_gqa") else 4, 24, 16)
    v = torch.randn_like(k)
    if kw.get("attn_mask") == "bool":
        kw = dict(kw, attn_mask=torch.rand(2, 1, 24, 24) > 0.3)

    def f(q, k, v):
        return autosdpa.sdpa(q, k, v, **kw)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), F.scaled_dot_product_attention(q, k, v, **kw))


def test_inductor_module_matches_eager():
    block = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 12, 32)
    with autosdpa.patch(), torch.no_grad():
        eager = block(x, x, x, need_weights=False)[0]
        compiled = torch.compile(block)(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_torchscript_compiles_pytorchs_own_op_under_patch():
    x = torch.randn(2, 5, 16)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    layer = nn.TransformerEncoderLayer(16, 4, batch_first=True).eval()
    with autosdpa.patch():
        scripted = torch.jit.script(mha)
        torch.jit.script(layer)

        @torch.jit.script
        def f(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert "aten::scaled_dot_product_attention" in str(f.graph)
    torch.testing.assert_close(scripted(x, x, x)[0], mha(x, x, x)[0])
    torch.jit.script(nn.MultiheadAttention(16, 4))  # still scriptable after unpatch


def test_jit_trace_records_pytorchs_op_without_autosdpa_warnings():
    q = torch.randn(1, 2, 8, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(lambda q: autosdpa.sdpa(q, q, q), (q,))
    assert not [w for w in caught if "autosdpa" in str(w.message) or issubclass(w.category, torch.jit.TracerWarning)]
    torch.testing.assert_close(traced(q), F.scaled_dot_product_attention(q, q, q))


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiled_op_follows_autocast(backend):
    """Under autocast F.sdpa computes in the autocast dtype (its floating inputs cast, float64 left alone);
    the compiled op must too, eager and compiled, and mixed input dtypes that autocast unifies must run."""
    def plain(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def ours(q, k, v):
        return autosdpa.sdpa(q, k, v, is_causal=True)
    q, k, v = qkv(L=32, D=16)
    compiled = torch.compile(ours, backend=backend, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for args in ((q, k, v), (q, k, v.bfloat16())):  # a compiled HF Llama under autocast hands such calls
            ref = plain(*args)
            for out in (ours(*args), compiled(*args)):
                assert out.dtype == ref.dtype == torch.bfloat16
                torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
        q64, k64, v64 = (t.double() for t in (q, k, v))
        assert compiled(q64, k64, v64).dtype == plain(q64, k64, v64).dtype == torch.float64


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_forward_mode_ad_through_a_compiled_graph_gives_the_tangent(backend):
    import torch.autograd.forward_ad as fwAD
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (t.double() for t in qkv(L=16, D=8))
    tangent = torch.randn_like(q)

    def jvp(fn):
        with fwAD.dual_level(), sdpa_kernel(SDPBackend.MATH):  # CPU flash has no forward AD (F.sdpa raises)
            out = fn(fwAD.make_dual(q, tangent), k, v)
            return fwAD.unpack_dual(out)
    ours = jvp(torch.compile(lambda q, k, v: autosdpa.sdpa(q, k, v), backend=backend))
    theirs = jvp(lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    assert ours.tangent is not None
    torch.testing.assert_close(ours.primal, theirs.primal)
    torch.testing.assert_close(ours.tangent, theirs.tangent)


def test_compiled_func_grad_works_as_with_sdpa():
    q, k, v = qkv(L=16, D=8)

    def loss(fn):
        return lambda q: fn(q, k, v, is_causal=True).square().sum()
    ours = torch.compile(torch.func.grad(loss(autosdpa.sdpa)))(q)
    theirs = torch.func.grad(loss(F.scaled_dot_product_attention))(q)
    torch.testing.assert_close(ours, theirs)
