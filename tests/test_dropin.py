"""Drop-in: for every input F.sdpa accepts, the same result (and gradients); for every input it rejects,
the same exception type. Compared against F.scaled_dot_product_attention itself."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import autosdpa

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _both(*args, **kwargs):
    """(F.sdpa result or exception, autosdpa result or exception), the second call made twice (miss, hit)."""
    def run(fn):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - comparing exception types is the point
            return e
    ref = run(F.scaled_dot_product_attention)
    first = run(autosdpa.scaled_dot_product_attention)
    second = run(autosdpa.scaled_dot_product_attention)
    return ref, first, second


def assert_same(ref, *outs, tol):
    for out in outs:
        if isinstance(ref, Exception):
            assert type(out) is type(ref), f"F.sdpa raised {ref!r}, autosdpa gave {out!r}"
        else:
            assert not isinstance(out, Exception), f"autosdpa raised {out!r} where F.sdpa returned"
            assert out.shape == ref.shape and out.dtype == ref.dtype
            torch.testing.assert_close(out, ref, atol=tol, rtol=tol, equal_nan=True)


def _qkv(shape_q, shape_kv, dtype, dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape_q, generator=g).to(dtype)
    k = torch.randn(*shape_kv, generator=g).to(dtype)
    vshape = shape_kv if dv is None else (*shape_kv[:-1], dv)
    v = torch.randn(*vshape, generator=g).to(dtype)
    return q, k, v


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [
    ((2, 3, 16, 8), (2, 3, 16, 8)),        # plain 4-D
    ((2, 3, 5, 8), (2, 3, 19, 8)),         # Lq != Lk
    ((6, 16, 8), (6, 16, 8)),              # 3-D (N, L, E)
    ((2, 2, 3, 9, 8), (2, 2, 3, 9, 8)),    # 5-D: all leading dims are batch
    ((1, 1, 1, 32), (1, 1, 40, 32)),       # decode-like
])
def test_shapes_dtypes_causal(shape, causal, dtype):
    q, k, v = _qkv(*shape, dtype)
    assert_same(*_both(q, k, v, is_causal=causal), tol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mask_shape", [(9, 13), (1, 1, 9, 13), (2, 1, 1, 13), (2, 3, 9, 13), (3, 1, 13)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks_broadcast(kind, mask_shape, dtype):
    q, k, v = _qkv((2, 3, 9, 16), (2, 3, 13, 16), dtype)
    g = torch.Generator().manual_seed(1)
    if kind == "bool":
        m = torch.rand(*mask_shape, generator=g) > 0.3
        m[..., 0] = True
    else:
        m = torch.randn(*mask_shape, generator=g).to(dtype)
    assert_same(*_both(q, k, v, attn_mask=m), tol=TOL[dtype])


@pytest.mark.parametrize("bias", [causal_upper_left, causal_lower_right])
@pytest.mark.parametrize("lq,lk", [(7, 7), (5, 12)])
def test_causal_bias(bias, lq, lk):
    q, k, v = _qkv((2, 2, lq, 16), (2, 2, lk, 16), torch.float32)
    assert_same(*_both(q, k, v, attn_mask=bias(lq, lk)), tol=1e-5)


def test_scale_gqa_dv_noncontiguous():
    q, k, v = _qkv((2, 8, 10, 16), (2, 2, 12, 16), torch.float32)
    assert_same(*_both(q, k, v, enable_gqa=True, scale=0.37), tol=1e-5)
    q, k, v = _qkv((2, 4, 10, 16), (2, 4, 12, 16), torch.float32, dv=24)
    assert_same(*_both(q, k, v), tol=1e-5)
    base = torch.randn(2, 12, 4, 16)  # (B, L, H, D) projected layout, viewed as (B, H, L, D)
    t = base.transpose(1, 2)
    assert_same(*_both(t, t, t, is_causal=True), tol=1e-5)
    t2 = torch.randn(2, 4, 16, 12).transpose(-1, -2)  # last-dim stride != 1
    assert_same(*_both(t2, t2, t2), tol=1e-5)


def test_dropout_matches_with_same_seed():
    q, k, v = _qkv((2, 2, 16, 8), (2, 2, 16, 8), torch.float32)
    autosdpa.sdpa(q, k, v, dropout_p=0.3)  # first sight: tuning must not consume the caller's RNG...
    for _ in range(2):
        torch.manual_seed(7)
        ref = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
        torch.manual_seed(7)
        out = autosdpa.sdpa(q, k, v, dropout_p=0.3)
        torch.testing.assert_close(out, ref)


def test_tuning_does_not_consume_rng():
    q, k, v = _qkv((1, 2, 16, 8), (1, 2, 16, 8), torch.float32)
    torch.manual_seed(3)
    autosdpa.sdpa(q, k, v, dropout_p=0.2)
    a = torch.rand(4)
    torch.manual_seed(3)
    F.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    b = torch.rand(4)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", [dict(is_causal=True), dict(attn_mask="bool"), dict(enable_gqa=True),
                                dict(attn_mask=causal_lower_right(6, 11))], ids=["causal", "mask", "gqa", "br"])
def test_gradients(kw, dtype):
    q, k, v = _qkv((2, 4, 6, 8), (2, 2 if kw.get("enable_gqa") else 4, 11, 8), dtype)
    if kw.get("attn_mask") == "bool":
        kw = dict(attn_mask=torch.rand(6, 11, generator=torch.Generator().manual_seed(2)) > 0.2)
        kw["attn_mask"][..., 0] = True
    grads = []
    for fn in (F.scaled_dot_product_attention, autosdpa.sdpa, autosdpa.sdpa):
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*xs, **kw)
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=dtype)).sum().backward()
        grads.append((out.detach(), *(x.grad for x in xs)))
    tol = TOL[dtype] * 10
    for got in grads[1:]:
        for a, b in zip(got, grads[0]):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_no_grad_mode_and_leaf_requires_grad():
    q, k, v = _qkv((1, 2, 8, 8), (1, 2, 8, 8), torch.float32)
    k.requires_grad_()
    out = autosdpa.sdpa(q, k, v)  # only k needs grad
    out.sum().backward()
    k2 = k.detach().clone().requires_grad_()
    F.scaled_dot_product_attention(q, k2, v).sum().backward()
    torch.testing.assert_close(k.grad, k2.grad)
    with torch.no_grad():
        assert_same(*_both(q, k, v), tol=1e-6)


INVALID = {
    "dtype mismatch": lambda: (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8).double(), torch.randn(1, 1, 4, 8)),
    "head dim mismatch": lambda: (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 6), torch.randn(1, 1, 4, 8)),
    "kv length mismatch": lambda: (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 6, 8)),
    "heads without gqa": lambda: (torch.randn(1, 4, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)),
    "2-D": lambda: (torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)),
    "int tensors": lambda: (torch.ones(1, 1, 4, 8, dtype=torch.long),) * 3,
}


@pytest.mark.parametrize("name", [n for n in INVALID if n != "kv length mismatch"])
def test_invalid_inputs_raise_the_same_type(name):
    assert_same(*_both(*INVALID[name]()), tol=0)


def test_kv_length_mismatch_raises_instead_of_reading_out_of_bounds():
    """torch 2.13's CPU flash kernel accepts k and v of different lengths and returns garbage that changes
    from call to call (it reads past v). autosdpa raises PyTorch's math-backend error instead."""
    q, k, v = INVALID["kv length mismatch"]()
    with pytest.raises(RuntimeError):
        autosdpa.sdpa(q, k, v)
    with pytest.raises(RuntimeError):
        autosdpa.sdpa(q, k, v)  # the cached plan too
    assert autosdpa.explain(q, k, v).source == "invalid"


@pytest.mark.parametrize("kw", [dict(attn_mask=torch.ones(3, 3, dtype=torch.int64)), dict(attn_mask=torch.ones(5, 7)),
                                dict(is_causal=True, attn_mask=torch.ones(4, 4, dtype=torch.bool)),
                                dict(enable_gqa=True, is_causal="yes"), dict(scale="x"), dict(dropout_p=None)],
                         ids=["int-mask", "bad-mask-shape", "causal+mask", "non-bool-causal", "str-scale",
                              "none-dropout"])
def test_invalid_arguments_raise_the_same_type(kw):
    q, k, v = _qkv((1, 2, 4, 8), (1, 2, 4, 8), torch.float32)
    assert_same(*_both(q, k, v, **kw), tol=0)


def test_nested_tensor_passes_through():
    nt = torch.nested.nested_tensor([torch.randn(2, 3, 8), torch.randn(2, 5, 8)], layout=torch.jagged)
    nt = nt.transpose(1, 2)
    out = autosdpa.sdpa(nt, nt, nt)
    ref = F.scaled_dot_product_attention(nt, nt, nt)
    for a, b in zip(out.unbind(), ref.unbind()):
        torch.testing.assert_close(a, b)


def test_grid_is_differential_over_combinations():
    """A denser sweep of the cheap combinations, each compared to F.sdpa."""
    for (lq, lk), causal, gqa, dt in itertools.product([(1, 7), (8, 8), (9, 4)], [False, True], [False, True],
                                                      [torch.float32, torch.bfloat16]):
        q, k, v = _qkv((2, 4, lq, 16), (2, 2 if gqa else 4, lk, 16), dt)
        assert_same(*_both(q, k, v, is_causal=causal, enable_gqa=gqa), tol=TOL[dt])
