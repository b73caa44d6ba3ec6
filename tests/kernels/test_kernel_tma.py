"""TMA (tensor descriptor) paths of the forward and decode kernels: when they are chosen, and that they compute
what the pointer (cp.async) path computes. Triton's interpreter emulates descriptors (out-of-bounds rows and
columns read as zero, stores clipped), so both paths run here; on a GPU they run for real (``-m gpu``)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from autosdpa_kernels import _common, decode, flash  # noqa: E402
from autosdpa_kernels import configs as kconfigs  # noqa: E402

from kernel_ref import assert_close, make_qkv, pytorch_lowp, reference  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Lower right causal bias")]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _fwd(q, k, v, **kw):
    (launch,) = flash.launches(q, k, v, **kw)
    return launch


def test_the_forward_passes_descriptors_where_they_describe_the_tensors(monkeypatch):
    monkeypatch.delenv(_common.TMA_ENV, raising=False)
    q, kv = meta(2, 8, 300, 128), meta(2, 2, 300, 128)
    fwd = _fwd(q, kv, kv, enable_gqa=True)          # meta tensors: an H100's launch
    assert fwd.meta["TMA"] and fwd.descs == (("Q", "BLOCK_M", 128), ("K", "BLOCK_N", 128), ("V", "BLOCK_N", 128),
                                             ("O", "BLOCK_M", 128))
    blhd = meta(2, 300, 8, 80).transpose(1, 2)      # strides (L*H*D, D, H*D, 1): not monotonic, all 16-B multiples
    fwd = _fwd(blhd, blhd, blhd)
    assert fwd.meta["TMA"] and fwd.descs[0] == ("Q", "BLOCK_M", 128)    # the box is the padded head dim
    assert _fwd(meta(1, 2, 64, 64, dtype=torch.float16), *[meta(1, 2, 64, 64, dtype=torch.float16)] * 2).meta["TMA"]
    wide = _fwd(*[meta(1, 2, 64, 512)] * 3)                   # head dim 512: its own table with descriptors
    assert wide.meta["TMA"] and wide.candidates(mode="all") == kconfigs.TMA_TABLES["fwd"][("l", "16")]
    assert wide.without_tma().candidates(mode="all") == kconfigs.TABLES["fwd"][("l", "16")]
    # what descriptors cannot express, or where they do not help, takes the pointer path
    assert not _fwd(*[meta(1, 2, 64, 64, dtype=torch.float32)] * 3).meta["TMA"]  # exact fp32 dots: FMA units
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True                           # TF32: tensor cores again
        assert _fwd(*[meta(1, 2, 64, 64, dtype=torch.float32)] * 3).meta["TMA"]
        assert not _fwd(*[meta(1, 2, 64, 512, dtype=torch.float32)] * 3).meta["TMA"]   # no TF32 table at 512
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    shared = meta(1, 1, 64, 64).expand(4, 2, 64, 64)                           # a broadcast (stride 0) batch
    assert not _fwd(meta(4, 2, 64, 64), shared, shared).meta["TMA"]
    monkeypatch.setenv(_common.TMA_ENV, "0")
    assert not _fwd(q, kv, kv, enable_gqa=True).meta["TMA"] and _fwd(q, kv, kv, enable_gqa=True).descs == ()


def test_decode_passes_k_and_v_as_descriptors(monkeypatch):
    monkeypatch.delenv(_common.TMA_ENV, raising=False)
    for D in (128, 512):
        (split,) = decode.launches(meta(1, 32, 1, D), meta(1, 8, 8192, D), meta(1, 8, 8192, D), enable_gqa=True)
        assert split.meta["TMA"] and [d[0] for d in split.descs] == ["K", "V"]   # Q rows are gathered: pointers


def test_a_descriptor_needs_an_aligned_base_and_16_byte_strides():
    x = torch.zeros(1000, dtype=torch.float16)
    assert _common.tma_tensor_ok(x[:960].view(1, 2, 60, 8))
    assert not _common.tma_tensor_ok(x[1:961].view(1, 2, 60, 8))              # base 2 bytes past 16-B alignment
    assert not _common.tma_tensor_ok(x[:960].view(1, 2, 80, 6))               # 12-byte rows
    assert not _common.tma_tensor_ok(x[:960].view(1, 2, 60, 8)[..., ::2])     # last stride 2


def test_only_hopper_and_newer_take_descriptors(monkeypatch):
    _common._hopper_or_newer.cache_clear()
    try:
        for cap, want in (((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, cap=cap: cap)
            _common._hopper_or_newer.cache_clear()
            assert _common.tma_device(torch.device("cuda", 0)) is want, cap
    finally:
        _common._hopper_or_newer.cache_clear()
    assert _common.tma_device(torch.device("meta"))
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    assert not _common.tma_device(torch.device("cpu"))                          # the CPU only under the interpreter


CASES = {
    "ragged": dict(shape=(1, 2, 2, 37, 45, 64)),
    "causal_top_left": dict(shape=(1, 2, 2, 45, 37, 64), causal="top_left"),
    "causal_bottom_right": dict(shape=(2, 2, 2, 33, 50, 32), causal="bottom_right"),
    "gqa_bool_mask": dict(shape=(2, 4, 2, 20, 40, 32), gqa=True, mask="bool"),
    "padded_head_dims": dict(shape=(1, 2, 2, 20, 24, 40), dv=24, causal="top_left"),
    "blhd": dict(shape=(2, 2, 1, 19, 33, 32), gqa=True, layout="blhd"),
}


def _case(name, dtype=torch.float16, seed=0, requires_grad=False):
    c = CASES[name]
    B, Hq, Hkv, Lq, Lk, D = c["shape"]
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, Dv=c.get("dv"), dtype=dtype, device=DEV, seed=seed,
                       layout=c.get("layout", "bhld"), requires_grad=requires_grad)
    mask = None
    if c.get("mask") == "bool":
        mask = (torch.rand(B, 1, Lq, Lk, generator=torch.Generator().manual_seed(seed)) > 0.4).to(DEV)
        mask[0, 0, 3] = False                                                   # a row with nothing to attend
    return q, k, v, dict(attn_mask=mask, causal=c.get("causal", "none"), enable_gqa=c.get("gqa", False))


@pytest.mark.parametrize("name", sorted(CASES))
def test_tma_and_pointer_forwards_agree_with_the_reference(name, monkeypatch):
    q, k, v, kw = _case(name, requires_grad=True)
    outs = {}
    for tma in ("1", "0"):
        monkeypatch.setenv(_common.TMA_ENV, tma)
        assert _fwd(q, k, v, **kw).meta["TMA"] is (tma == "1")
        outs[tma] = flash.attention(q, k, v, **kw)
    ref = reference(q, k, v, kw["attn_mask"], kw["causal"], None, kw["enable_gqa"])
    for tma, out in outs.items():
        assert_close(out, ref, torch.float16, what=f"TMA={tma}")
    grads = torch.autograd.grad(outs["1"], (q, k, v), torch.ones_like(outs["1"]))   # the backward after TMA
    for a, b in zip(grads, torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))):
        assert_close(a, b, torch.float16, grad=True)


@pytest.mark.parametrize("causal", ["none", "bottom_right"])
def test_tma_and_pointer_decodes_agree_with_the_reference(causal, monkeypatch):
    q, k, v = make_qkv(2, 8, 2, 3, 150, 64, dtype=torch.float16, device=DEV)
    for tma in ("1", "0"):
        monkeypatch.setenv(_common.TMA_ENV, tma)
        (split,) = decode.launches(q, k, v, causal=causal, enable_gqa=True, num_splits=4)
        assert split.meta["TMA"] is (tma == "1")
        out = decode.attention(q, k, v, causal=causal, enable_gqa=True, num_splits=4)
        assert_close(out, reference(q, k, v, None, causal, None, True), torch.float16, what=f"TMA={tma}")


@pytest.mark.parametrize("which", ["flash", "decode"])
def test_a_runner_falls_back_to_pointers_for_a_misaligned_input(which, monkeypatch):
    monkeypatch.delenv(_common.TMA_ENV, raising=False)
    Lq = 1 if which == "decode" else 24
    mod = flash if which == "flash" else decode
    q, k, v = make_qkv(1, 4, 2, Lq, 40, 32, dtype=torch.float16, device=DEV)
    run = mod.forward_runner(q, k, v, enable_gqa=True)
    assert mod.launches(q, k, v, enable_gqa=True)[0].meta["TMA"]
    # the same layout one element into a buffer: 2 bytes past the alignment a descriptor needs
    buf = torch.randn(k.numel() + 8, generator=torch.Generator().manual_seed(7)).to(torch.float16).to(DEV)
    k2 = buf[1:1 + k.numel()].view(k.shape)
    assert k2.stride() == k.stride() and k2.data_ptr() % 16
    with torch.no_grad():
        out = run(q, k2, v, None, None)
    assert_close(out, reference(q, k2, v, enable_gqa=True), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_negative_scale_takes_the_unfolded_softmax(dtype):
    """The forward folds the scale into the max (max(s * c) = c * max(s) needs c > 0); a negative scale (rare,
    but F.sdpa allows it) runs the variant that scales first."""
    q, k, v = make_qkv(1, 2, 2, 20, 36, 32, dtype=dtype, device=DEV)
    assert _fwd(q, k, v, scale=-0.3).meta["NEG_SCALE"] and not _fwd(q, k, v, scale=0.3).meta["NEG_SCALE"]
    for causal in ("none", "top_left"):
        ref = reference(q, k, v, None, causal, -0.3)
        assert_close(flash.attention(q, k, v, causal=causal, scale=-0.3), ref, dtype, what=causal)
    run = flash.forward_runner(q, k, v)
    assert_close(run(q, k, v, None, -0.3), reference(q, k, v, scale=-0.3), dtype, what="runner")
    assert_close(run(q, k, v, None, 0.3), reference(q, k, v, scale=0.3), dtype, what="runner, positive")
    qd = q[:, :, :2]
    assert_close(decode.attention(qd, k, v, scale=-0.3, num_splits=3), reference(qd, k, v, scale=-0.3), dtype,
                 what="decode")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tma", ["1", "0"])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_cuda_bf16_forward_both_paths(tma, layout, monkeypatch):
    monkeypatch.setenv(_common.TMA_ENV, tma)
    q, k, v = make_qkv(2, 8, 2, 300, 517, 128, dtype=torch.bfloat16, device="cuda", layout=layout)
    if torch.cuda.get_device_capability()[0] >= 9:
        assert _fwd(q, k, v, causal="bottom_right", enable_gqa=True).meta["TMA"] is (tma == "1")
    for causal in ("none", "bottom_right"):
        out = flash.attention(q, k, v, causal=causal, enable_gqa=True)
        assert_close(out, reference(q, k, v, None, causal, None, True), torch.bfloat16, what=causal,
                     base=pytorch_lowp(q, k, v, None, causal, None, True))
    # decode with many splits (the fused combine) on both paths
    qd = q[:, :, :1]
    for splits in (None, 37):
        out = decode.attention(qd, k, v, causal="bottom_right", enable_gqa=True, num_splits=splits)
        assert_close(out, reference(qd, k, v, None, "bottom_right", None, True), torch.bfloat16,
                     base=pytorch_lowp(qd, k, v, None, "bottom_right", None, True), what=f"decode {splits}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_of_the_fused_decode_stay_correct():
    """The split counters are reset by each launch's last split, so every replay of a captured decode starts
    from zero (its counter buffer belongs to the capture stream)."""
    q, k, v = make_qkv(1, 32, 8, 1, 8192, 128, dtype=torch.bfloat16, device="cuda")
    run = decode.forward_runner(q, k, v, enable_gqa=True)
    assert decode.launches(q, k, v, enable_gqa=True)[0].meta["SPLIT"]
    ref = reference(q, k, v, enable_gqa=True)
    with torch.no_grad():
        run(q, k, v, None, None)                       # compiled and autotuned outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run(q, k, v, None, None)
        for _ in range(3):
            out.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert_close(out, ref, torch.bfloat16, base=pytorch_lowp(q, k, v, enable_gqa=True))
