"""CUDA checks (run with `-m gpu` on a GPU machine): eligibility agrees with what PyTorch actually runs,
results match F.sdpa, and the chosen backend is never slower than PyTorch's own pick beyond noise."""
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right, causal_upper_left
from torch.utils._python_dispatch import TorchDispatchMode

import autosdpa
from autosdpa.backends import Call
from autosdpa.backends.torch_backends import get_torch, torch_flags
from autosdpa.timing import time_interleaved

pytestmark = pytest.mark.gpu

SDP = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
       "cudnn": SDPBackend.CUDNN_ATTENTION}


def _case(dtype, b, hq, hkv, lq, lk, d, mask=None, causal=False, grad=False, dropout=0.0, bias=None):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, hq, lq, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(b, hkv, lk, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(b, hkv, lk, d, device="cuda", dtype=dtype, generator=g)
    m = None
    if mask == "bool":
        m = torch.rand(b, 1, lq, lk, device="cuda", generator=g) > 0.2
    elif mask == "float":
        m = torch.randn(b, 1, lq, lk, device="cuda", dtype=dtype, generator=g)
    elif bias == "upper_left":
        m = causal_upper_left(lq, lk)
    elif bias == "lower_right":
        m = causal_lower_right(lq, lk)
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, dict(attn_mask=m, is_causal=causal, enable_gqa=hq != hkv, dropout_p=dropout)


class _Ran(TorchDispatchMode):
    """Which of PyTorch's CUDA backends ran (math decomposes; its softmax is the tell)."""

    OPS = {"aten._scaled_dot_product_flash_attention": "flash", "aten._flash_attention_forward": "flash",
           "aten._scaled_dot_product_efficient_attention": "efficient",
           "aten._efficient_attention_forward": "efficient", "aten._scaled_dot_product_cudnn_attention": "cudnn",
           "aten._safe_softmax": "math"}

    def __init__(self):
        super().__init__()
        self.ran = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = self.OPS.get(str(func.overloadpacket))
        if name:
            self.ran.add(name)
        return func(*args, **(kwargs or {}))


CASES = [
    (torch.bfloat16, 2, 8, 8, 256, 256, 64), (torch.float16, 2, 8, 2, 128, 384, 128),
    (torch.float32, 1, 4, 4, 64, 64, 64), (torch.bfloat16, 1, 8, 8, 128, 128, 256),
    (torch.bfloat16, 4, 32, 8, 1, 4096, 128), (torch.float16, 2, 4, 4, 100, 100, 80),
    (torch.bfloat16, 2, 8, 8, 96, 160, 72), (torch.float16, 2, 8, 4, 160, 96, 64),
]
EXTRAS = [{}, {"causal": True}, {"mask": "bool"}, {"mask": "float"}, {"grad": True}, {"dropout": 0.1},
          {"causal": True, "dropout": 0.1, "grad": True}, {"mask": "bool", "grad": True},
          {"bias": "upper_left"}, {"bias": "lower_right"}, {"bias": "lower_right", "grad": True},
          {"bias": "lower_right", "dropout": 0.1}, {"bias": "upper_left", "dropout": 0.1, "grad": True}]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[1:])) + f"-{c[0]}".replace("torch.", ""))
@pytest.mark.parametrize("extra", EXTRAS, ids=lambda e: "+".join(f"{k}={v}" for k, v in e.items()) or "plain")
def test_eligibility_matches_what_pytorch_runs(case, extra):
    """A backend autosdpa calls eligible is exactly the one PyTorch runs under sdpa_kernel(that backend):
    GQA (cases with Hkv != Hq), CausalBias both alignments (lower-right tries flash with no mask first, then
    efficient attention's own variant, then the materialised mask), dropout, masks and grad included."""
    q, k, v, kw = _case(*case, **extra)
    call = Call(q, k, v, kw["attn_mask"], kw["dropout_p"], kw["is_causal"], None, kw["enable_gqa"],
                needs_grad=q.requires_grad)
    assert torch_flags() == (True, True, True, True)
    for name, sdp in SDP.items():
        reasons = get_torch(name).not_supported_reasons(call)
        rec = _Ran()
        try:
            with sdpa_kernel(sdp), rec:
                out = F.scaled_dot_product_attention(q, k, v, **kw)
                if q.requires_grad:
                    out.sum().backward()
            ran = rec.ran
        except RuntimeError:
            ran = set()
        assert ran == ({name} if not reasons else set()), (name, ran, reasons)


@pytest.mark.parametrize("case", CASES[:4])
def test_results_match_on_cuda(case):
    q, k, v, kw = _case(*case, causal=True)
    ref = F.scaled_dot_product_attention(q, k, v, **kw)
    for _ in range(2):
        out = autosdpa.sdpa(q, k, v, **kw)
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("case", [(torch.bfloat16, 4, 16, 16, 1024, 1024, 128),
                                  (torch.bfloat16, 8, 32, 8, 1, 8192, 128),
                                  (torch.float16, 2, 16, 16, 2048, 2048, 64)])
def test_winner_not_slower_than_pytorch_default(case):
    q, k, v, kw = _case(*case, causal=case[4] > 1)
    autosdpa.sdpa(q, k, v, **kw)  # tune
    samples = time_interleaved({"autosdpa": lambda: autosdpa.sdpa(q, k, v, **kw),
                                "pytorch": lambda: F.scaled_dot_product_attention(q, k, v, **kw)},
                               q.device, budget_s=1.0, min_rounds=30, max_rounds=200)
    ours, theirs = statistics.median(samples["autosdpa"]), statistics.median(samples["pytorch"])
    print(f"{case}: autosdpa {ours * 1e6:.1f} us ({autosdpa.explain(q, k, v, **kw).backend}) "
          f"vs PyTorch {theirs * 1e6:.1f} us")
    assert ours <= theirs * 1.10


# -- the dispatcher's CUDA paths (issue 8 items 6-7, issue 12) ----------------------------------------------------

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("extra", [{}, {"causal": True}, {"mask": "bool"}, {"grad": True}],
                         ids=["plain", "causal", "mask", "grad"])
def test_our_kernels_compile_wherever_eligible(case, extra):
    q, k, v, kw = _case(*case, **extra)
    d = autosdpa.explain(q, k, v, **kw)
    for name in ("triton_flash", "triton_decode"):
        why = d.rejected.get(name, "")
        assert "Compilation" not in why and "compile" not in why.lower() and "NameError" not in why, (name, why)
    out = autosdpa.sdpa(q, k, v, **kw)
    ref = F.scaled_dot_product_attention(q, k, v, **kw)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


def _block(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return torch.nn.MultiheadAttention(256, 8, batch_first=True, device="cuda", dtype=dtype).eval()


def test_cuda_graph_capture_and_replay_with_patch():
    block = _block()
    x = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
    with autosdpa.patch(), torch.no_grad():
        eager = block(x, x, x, need_weights=False)[0]  # first sight: tuned here, outside capture
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                block(x, x, x, need_weights=False)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            captured = block(x, x, x, need_weights=False)[0]
        g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_patched_block_on_cuda(mode):
    block = _block()
    x = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
    with autosdpa.patch(), torch.no_grad():
        eager = block(x, x, x, need_weights=False)[0]
        compiled = torch.compile(block, mode=mode)
        for _ in range(3):
            out = compiled(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(out, eager, atol=2e-2, rtol=2e-2)


def test_compiled_training_gradients_on_cuda():
    q, k, v, kw = _case(torch.bfloat16, 2, 8, 8, 256, 256, 64, causal=True, grad=True)

    def f(q, k, v):
        return autosdpa.sdpa(q, k, v, is_causal=True)
    g_c = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k, v).float().square().sum(), (q, k, v))
    g_e = torch.autograd.grad(f(q, k, v).float().square().sum(), (q, k, v))
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


def test_hf_tokens_per_second_side_by_side():
    transformers = pytest.importorskip("transformers")
    import time

    from autosdpa.integrations import hf

    hf.register()
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    prompt = torch.randint(0, 1000, (4, 32), device="cuda")
    tokens, rate = {}, {}
    base = transformers.LlamaForCausalLM(cfg).state_dict()
    models = {}
    for impl in ("sdpa", "autosdpa"):  # same weights, two attention implementations
        models[impl] = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=impl)
        models[impl].load_state_dict(base)
        models[impl].to("cuda", torch.bfloat16).eval()
    for impl in ("sdpa", "autosdpa", "sdpa", "autosdpa"):  # interleaved; the second round is what counts
        model = models[impl]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=64, do_sample=False, min_new_tokens=64)
        torch.cuda.synchronize()
        rate[impl] = out[:, 32:].numel() / (time.perf_counter() - t0)
        tokens[impl] = out
    print(f"tokens/s: sdpa {rate['sdpa']:.0f}, autosdpa {rate['autosdpa']:.0f}")
    assert torch.equal(tokens["sdpa"], tokens["autosdpa"])


# -- masks with structure on CUDA: provenance only ------------------------------------------------------------------

@pytest.mark.parametrize("causal,side", [(False, "right"), (True, "right"), (True, "left")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mask_objects_on_cuda_give_sdpas_result_without_a_sync(causal, side, dtype):
    """A key padding object on CUDA: F.sdpa's result on the dense mask (fully masked rows exactly: whatever
    F.sdpa's own pick returns for them here), and after the first call not one host sync per call (a sync
    would raise under the sync debug mode), so a model's layers never wait for the device."""
    from autosdpa.masks import key_padding

    b, h, L, d = 4, 8, 512, 64
    lens = [L, 410, 205, 0]
    q, k, v, _ = _case(dtype, b, h, h, L, L, d)
    m = key_padding(lens, L, L, causal=causal, side=side, device="cuda")
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=m.materialize())
    autosdpa.sdpa(q, k, v, attn_mask=m)  # first sight: tunes (and syncs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = autosdpa.sdpa(q, k, v, attn_mask=m)
        again = autosdpa.sdpa(q, k, v, attn_mask=key_padding([L, 400, 200, 0], L, L, causal=causal, side=side,
                                                             device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2, equal_nan=True)
    dead = ~m.materialize().expand(b, 1, L, L).any(-1)
    assert torch.equal(got[dead[:, 0][:, None].expand(b, h, L)].nan_to_num(7.0),
                       want[dead[:, 0][:, None].expand(b, h, L)].nan_to_num(7.0))
    assert again.shape == want.shape


def test_dense_cuda_masks_are_never_read():
    """On CUDA the values of a dense mask are never looked at (that would sync): no structure, no rewrite."""
    from autosdpa.forms import structure

    q, k, v, _ = _case(torch.float16, 2, 4, 4, 256, 256, 64)
    m = torch.ones(256, 256, device="cuda", dtype=torch.bool).tril()
    assert structure.detect(m, q, k) is None
    assert "struct=" not in autosdpa.explain(q, k, v, attn_mask=m).problem
