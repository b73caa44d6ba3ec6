"""PyTorch's backends run through their ATen ops: the same as F.sdpa under ``sdpa_kernel(that backend)``
(values bitwise, gradients, dropout stream, exception types, strides), eligibility without PyTorch's
process-wide flags, and PyTorch's output layout."""
import itertools
import random
import threading
import tokenize
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right, causal_upper_left
from torch.utils._python_dispatch import TorchDispatchMode

import autosdpa
from autosdpa.backends import Call
from autosdpa.backends import torch_ops
from autosdpa.backends.torch_backends import get_torch, pytorch_choice, torch_flags
from autosdpa.backends.torch_checks import cpu_flash_reasons
from autosdpa.backends.torch_layout import (dense_order, has_order, order_strides, output_order, output_strides,
                                           restride, strides_match)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SDP = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
       "cudnn": SDPBackend.CUDNN_ATTENTION}
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ALL_ON = (True, True, True, True)


# -- building calls ---------------------------------------------------------------------------------------------

def _tensor(shape, dtype, layout="bhld", grad=False, device="cpu", seed=0):
    """A tensor of ``shape`` laid out in memory as ``layout``: a leaf, or a view of a leaf that requires grad."""
    g = torch.Generator().manual_seed(seed)
    if len(shape) != 4 or layout == "bhld":
        base = torch.randn(shape, generator=g)
        view = lambda t: t  # noqa: E731
    else:
        b, h, l, d = shape
        if layout == "blhd":  # (B, L, H, D) buffer, as in nn.MultiheadAttention / nanoGPT
            base, view = torch.randn(b, l, h, d, generator=g), lambda t: t.transpose(1, 2)
        elif layout == "split":  # one third of a fused qkv projection: not dense
            base, view = torch.randn(b, l, h, 3 * d, generator=g), lambda t: t[..., d:2 * d].transpose(1, 2)
        elif layout == "lastdim":  # last dim not unit-stride
            base, view = torch.randn(b, h, d, l, generator=g), lambda t: t.transpose(2, 3)
        elif layout == "expand":  # stride 0 on the batch dim
            base, view = torch.randn(1, h, l, d, generator=g), lambda t: t.expand(b, h, l, d)
        else:
            raise ValueError(layout)
    base = base.to(device=device, dtype=dtype).requires_grad_(grad and dtype.is_floating_point)
    return view(base)


def qkv(dtype, grad, b=2, hq=4, hkv=None, lq=5, lk=7, d=8, dv=None, layout="bhld", nd=4, device="cpu"):
    hkv, dv = hkv or hq, dv or d
    lead = {3: (b * hq,), 4: (b, hq), 5: (2, b, hq), 2: ()}[nd]
    lead_kv = {3: (b * hkv,), 4: (b, hkv), 5: (2, b, hkv), 2: ()}[nd]
    mk = lambda shape, seed: _tensor(shape, dtype, layout, grad, device, seed)  # noqa: E731
    return mk((*lead, lq, d), 1), mk((*lead_kv, lk, d), 2), mk((*lead_kv, lk, dv), 3)


def _mask(shape, kind, dtype, device="cpu", grad=False, seed=4):
    g = torch.Generator().manual_seed(seed)
    if kind == "bool_empty_row":  # one query row may attend to nothing: where backends' fill values differ
        m = torch.rand(shape, generator=g) > 0.3
        m[..., 0] = True
        m[..., 1, :] = False
        return m.to(device)
    if kind == "bool":
        m = torch.rand(shape, generator=g) > 0.3
        if m.dim():
            m[..., 0] = True  # every row sees a key
        else:
            m = torch.tensor(True)
        return m.to(device)
    m = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return m.requires_grad_(grad)


def case(**over):
    """A call builder: (dtype, grad) -> (q, k, v, kwargs); ``over`` sets qkv() arguments and F.sdpa kwargs."""
    shape_keys = {"b", "hq", "hkv", "lq", "lk", "d", "dv", "layout", "nd"}
    shape = {k: v for k, v in over.items() if k in shape_keys}
    extra = {k: v for k, v in over.items() if k not in shape_keys}

    def build(dtype, grad, device="cpu"):
        q, k, v = qkv(dtype, grad, device=device, **shape)
        kw = {}
        for key, val in extra.items():
            if key == "mask":  # (shape, kind[, mask dtype])
                mshape, kind, *mdt = val
                kw["attn_mask"] = _mask(mshape, kind, mdt[0] if mdt else dtype, device, grad=False)
            elif key == "mask_grad":
                kw["attn_mask"] = _mask(val, "float", dtype, device, grad=grad)
            elif key == "bias":
                kw["attn_mask"] = val
            else:
                kw[key] = val
        return q, k, v, kw
    return build


B, H, LQ, LK, D = 2, 4, 5, 7, 8
CASES = {
    "square": case(lq=6, lk=6),
    "lq_ne_lk": case(),
    "3d": case(nd=3),
    "5d": case(nd=5),
    "2d": case(nd=2),
    "gqa": case(hkv=2, enable_gqa=True),
    "gqa_flag_equal_heads": case(enable_gqa=True),
    "gqa_causal": case(hkv=2, enable_gqa=True, is_causal=True),
    "mask_bool_2d": case(mask=((LQ, LK), "bool")),
    "mask_bool_4d_broadcast": case(mask=((B, 1, 1, LK), "bool")),
    "mask_bool_4d": case(mask=((B, H, LQ, LK), "bool")),
    "mask_bool_empty_row": case(mask=((B, 1, LQ, LK), "bool_empty_row")),
    "mask_float_2d": case(mask=((LQ, LK), "float")),
    "mask_float_4d_heads_broadcast": case(mask=((B, 1, LQ, LK), "float")),
    "mask_float32_any_dtype": case(mask=((LQ, LK), "float", torch.float32)),
    "mask_3d": case(mask=((1, LQ, LK), "float")),
    "mask_gqa": case(hkv=2, enable_gqa=True, mask=((LQ, LK), "bool")),
    "mask_requires_grad": case(mask_grad=(LQ, LK)),
    "causal_square": case(lq=6, lk=6, is_causal=True),
    "causal_upper_left_lq_ne_lk": case(is_causal=True),
    "bias_upper_left": case(bias=causal_upper_left(LQ, LK)),
    "bias_lower_right": case(bias=causal_lower_right(LQ, LK)),
    "bias_lower_right_square": case(lq=6, lk=6, bias=causal_lower_right(6, 6)),
    "bias_lower_right_gqa": case(hkv=2, enable_gqa=True, bias=causal_lower_right(LQ, LK)),
    "bias_lower_right_dropout": case(bias=causal_lower_right(LQ, LK), dropout_p=0.3),
    "scale_zero": case(scale=0.0),
    "scale_negative": case(scale=-0.5, is_causal=True),
    "scale_small": case(scale=0.3, mask=((LQ, LK), "float")),
    "dropout": case(dropout_p=0.3),
    "dropout_causal_mask": case(dropout_p=0.5, mask=((B, 1, LQ, LK), "bool")),
    "blhd": case(layout="blhd", is_causal=True),
    "split_qkv": case(layout="split", lq=6, lk=6, is_causal=True),
    "last_dim_strided": case(layout="lastdim"),
    "expanded_batch": case(layout="expand"),
    "dv_ne_d": case(dv=6),
    "d_odd": case(d=5),
    "lq_1": case(lq=1, lk=9),
    "batch_broadcast_kv": case(),  # replaced below: k and v with batch 1
    "empty_lq": case(lq=0),
    "empty_lk": case(lk=0),
    "empty_batch": case(b=0),
    "zero_head_dim_qk": case(d=0, dv=3),
    "causal_and_mask": case(is_causal=True, mask=((LQ, LK), "bool")),
    "negative_dropout": case(dropout_p=-0.25),
    "mask_1d": case(mask=((LK,), "bool")),  # math takes it; PyTorch's flash check raises IndexError
    "mask_0d": case(mask=((), "bool")),
}


def _batch_broadcast(dtype, grad, device="cpu"):
    q, _, _ = qkv(dtype, grad, device=device)
    _, k, v = qkv(dtype, grad, b=1, device=device)
    return q, k, v, {}


CASES["batch_broadcast_kv"] = _batch_broadcast

# Invalid inputs: PyTorch raises; so must autosdpa, with the same exception type.
INVALID = {
    "dtype_mismatch": lambda dt, g: (*_swap_v(qkv(dt, g), dtype=torch.float64 if dt != torch.float64 else
                                              torch.float32), {}),
    "heads_mismatch_without_gqa": case(hkv=2),
    "gqa_heads_not_divisible": case(hq=4, hkv=3, enable_gqa=True),
    "mask_int": case(mask=((LQ, LK), "float", torch.int32)),
    "mask_5d": case(mask=((1, 1, 1, LQ, LK), "bool")),
    "mask_wrong_shape": case(mask=((3, LQ, LK), "bool")),
    "head_dim_mismatch": lambda dt, g: (*_swap_v(qkv(dt, g), d=6, k=True), {}),
    "dropout_above_one": case(dropout_p=1.5),
    "bias_and_is_causal": case(bias=causal_lower_right(LQ, LK), is_causal=True),
    "bias_lower_right_dtype_mismatch": lambda dt, g: (*_swap_v(qkv(dt, g), dtype=torch.float64 if
                                                             dt != torch.float64 else torch.float32),
                                                      {"attn_mask": causal_lower_right(LQ, LK)}),
    "int_inputs": lambda dt, g: (*(t.detach().to(torch.int32) for t in qkv(dt, False)), {}),
}


def _swap_v(ts, dtype=None, d=None, k=False):
    q, kk, v = ts
    if dtype is not None:
        v = v.detach().to(dtype)
    if d is not None:
        kk = torch.randn(*kk.shape[:-1], d, dtype=kk.dtype)
    return q, kk, v


# The one deliberate difference: PyTorch's CPU flash kernel reads past v when k and v lengths differ.
KV_MISMATCH = lambda dt, g: (*_kv_mismatch(qkv(dt, g)), {})  # noqa: E731


def _kv_mismatch(ts):
    q, k, v = ts
    return q, k, torch.randn(*v.shape[:-2], v.shape[-2] + 2, v.shape[-1], dtype=v.dtype)


# -- running and comparing --------------------------------------------------------------------------------------

def _inputs(q, k, v, kw):
    m = kw.get("attn_mask")
    return [t for t in (q, k, v, m) if isinstance(t, torch.Tensor) and type(t) is torch.Tensor and t.requires_grad]


def _outcome(fn, wrt):
    """(exception type or None, output, gradients or exception type): what one call and its backward give."""
    torch.manual_seed(1234)
    try:
        out = fn()
    except Exception as e:  # the type is what must match
        return type(e), None, None
    grads = None
    if out.requires_grad and wrt:
        g = (torch.arange(out.numel(), dtype=torch.float32).reshape(out.shape) / max(out.numel(), 1)).to(out.dtype)
        try:
            grads = torch.autograd.grad(out, wrt, g, allow_unused=True)
        except Exception as e:
            grads = type(e)
    return None, out, grads


def _ours(name, q, k, v, kw):
    return _outcome(lambda: get_torch(name).run(q, k, v, **kw), _inputs(q, k, v, kw))


def _ours_runner(name, q, k, v, kw):
    run = get_torch(name).runner(Call(q, k, v, **kw))
    return _outcome(lambda: run(q, k, v, kw.get("attn_mask"), kw.get("dropout_p", 0.0), kw.get("is_causal", False),
                                kw.get("scale"), kw.get("enable_gqa", False)), _inputs(q, k, v, kw))


def _theirs(name, q, k, v, kw):
    def go():
        with sdpa_kernel(SDP[name]):
            return F.scaled_dot_product_attention(q, k, v, **kw)
    return _outcome(go, _inputs(q, k, v, kw))


def _same(a, b, where=""):
    if a is None or b is None or isinstance(a, type) or isinstance(b, type):
        assert a == b, where
        return
    assert a.dtype == b.dtype and a.shape == b.shape, where
    assert a.stride() == b.stride() or a.numel() == 0, (where, a.stride(), b.stride())
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{where}: {m}")


def _assert_identical(ours, theirs, where, grad_tol=0.0):
    """Same exception type, or the same output (bitwise, strides included) and gradients (bitwise, or within
    ``grad_tol`` where PyTorch's own backward is not deterministic: CUDA efficient attention and cuDNN)."""
    assert ours[0] == theirs[0], (where, ours[0], theirs[0])
    _same(ours[1], theirs[1], where + " output")
    if isinstance(ours[2], tuple) and isinstance(theirs[2], tuple):
        for i, (a, b) in enumerate(zip(ours[2], theirs[2])):
            if grad_tol and a is not None and b is not None:
                assert a.shape == b.shape and a.stride() == b.stride(), (where, i)
                torch.testing.assert_close(a, b, rtol=grad_tol, atol=grad_tol, equal_nan=True)
            else:
                _same(a, b, f"{where} grad {i}")
    else:
        assert ours[2] == theirs[2], (where, ours[2], theirs[2])


@pytest.mark.parametrize("name", ["math", "flash"])
@pytest.mark.parametrize("case_id", list(CASES) + list(INVALID))
def test_direct_run_is_sdpa_kernel_bitwise(name, case_id):
    build = CASES.get(case_id) or INVALID[case_id]
    for dtype, grad in itertools.product(DTYPES, (False, True)):
        q, k, v, kw = build(dtype, grad)
        ours, theirs = _ours(name, q, k, v, kw), _theirs(name, q, k, v, kw)
        _assert_identical(ours, theirs, f"{name} {case_id} {dtype} grad={grad}")
        # what a plan runs for this layout: the backend's runner, made once the checks passed
        _assert_identical(_ours_runner(name, q, k, v, kw), theirs, f"{name} {case_id} {dtype} grad={grad} runner")
        if case_id in INVALID:
            assert theirs[0] is not None, f"{case_id} was meant to be invalid for PyTorch"


def test_direct_flash_refuses_kv_length_mismatch_where_pytorch_reads_out_of_bounds():
    q, k, v, kw = KV_MISMATCH(torch.float32, False)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        F.scaled_dot_product_attention(q, k, v)  # PyTorch: no error (garbage)
    with pytest.raises(RuntimeError, match="different sequence lengths"):
        get_torch("flash").run(q, k, v)
    # Eligibility stays PyTorch's (these inputs are invalid, not a backend matter): math raises for them too.
    assert get_torch("flash").not_supported_reasons(Call(q, k, v)) == []
    _assert_identical(_ours("math", q, k, v, kw), _theirs("math", q, k, v, kw), "math kv mismatch")


def test_dropout_uses_the_callers_random_stream_like_pytorch():
    q, k, v = qkv(torch.float32, False, lq=16, lk=16)
    outs = []
    for fn in (lambda: get_torch("math").run(q, k, v, dropout_p=0.5),
               lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)):
        torch.manual_seed(7)
        first = fn()
        outs.append((first, fn(), torch.rand(3)))  # the stream after the calls advanced the same way
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert not torch.equal(outs[0][0], outs[0][1])


# -- eligibility ------------------------------------------------------------------------------------------------

class _Ops(TorchDispatchMode):
    """Records which of PyTorch's CPU backends ran (math decomposes; its softmax is the tell)."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    OPS = {"aten._scaled_dot_product_flash_attention_for_cpu": "flash",
           "aten._scaled_dot_product_flash_attention": "flash", "aten._flash_attention_forward": "flash",
           "aten._scaled_dot_product_efficient_attention": "efficient",
           "aten._efficient_attention_forward": "efficient", "aten._scaled_dot_product_cudnn_attention": "cudnn",
           "aten._safe_softmax": "math"}

    def ran(self) -> str | None:
        names = {self.OPS[op] for op in self.ops if op in self.OPS}
        assert len(names) <= 1, names
        return names.pop() if names else None


def _pytorch_runs(q, k, v, kw, backends=None) -> str | None:
    """Which backend F.sdpa runs for this call (under ``sdpa_kernel(backends)`` if given); None if it raises."""
    rec = _Ops()
    try:
        with (sdpa_kernel(backends) if backends else _nothing()), rec:
            out = F.scaled_dot_product_attention(q, k, v, **kw)
            if out.requires_grad:
                out.sum().backward()
    except Exception:
        return None
    return rec.ran()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


VALID = [c for c in CASES if not c.startswith("empty") and c not in ("causal_and_mask", "negative_dropout", "mask_1d",
                                                                     "mask_0d")]


@pytest.mark.parametrize("case_id", VALID)
def test_eligibility_matches_what_pytorch_runs_cpu(case_id):
    """CPU analogue of tests/test_gpu.py's check: a backend autosdpa calls eligible is the one PyTorch runs
    under sdpa_kernel(that backend), and vice versa (CausalBias both ways, GQA, dropout, grad included)."""
    for dtype, grad in itertools.product(DTYPES, (False, True)):
        q, k, v, kw = CASES[case_id](dtype, grad)
        call = Call(q, k, v, kw.get("attn_mask"), kw.get("dropout_p", 0.0), kw.get("is_causal", False),
                    kw.get("scale"), kw.get("enable_gqa", False), needs_grad=grad)
        for name in ("math", "flash"):
            reasons = get_torch(name).not_supported_reasons(call)
            ran = _pytorch_runs(q, k, v, kw, [SDP[name]])
            assert (ran == name) == (not reasons), (case_id, dtype, grad, name, ran, reasons)
        for name in ("efficient", "cudnn"):
            assert get_torch(name).not_supported_reasons(call)


@pytest.mark.parametrize("flags", [None, [SDPBackend.MATH], [SDPBackend.FLASH_ATTENTION],
                                   [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]],
                         ids=["default", "math", "flash", "flash+math"])
def test_pytorch_choice_names_what_pytorch_runs(flags):
    for case_id, build in {**CASES, **INVALID}.items():
        for dtype in (torch.float32, torch.bfloat16):
            _check_choice_is_what_runs(case_id, dtype, flags, *build(dtype, True))


def _check_choice_is_what_runs(case_id, dtype, flags, q, k, v, kw):
    call = Call(q, k, v, kw.get("attn_mask"), kw.get("dropout_p", 0.0), kw.get("is_causal", False),
                kw.get("scale"), kw.get("enable_gqa", False), needs_grad=True)
    with (sdpa_kernel(flags) if flags else _nothing()):
        before = torch_flags()
        pick = pytorch_choice(call)
        assert torch_flags() == before
    ran = _pytorch_runs(q, k, v, kw, flags)
    if ran is None and pick is not None:  # PyTorch picked it, and it raised: so must running it
        assert _ours(pick, q, k, v, kw)[0] is not None, (case_id, dtype, flags, pick)
    else:
        assert pick == ran, (case_id, dtype, flags, pick, ran)


MIRROR_FACTORS = {  # first value: what flash takes; the others vary one condition of use_flash_attention_cpp
    "nd": [4, 3, 5],
    "dtype": [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int32],
    "lens": [(5, 7), (0, 7), (5, 0), (1, 1), (7, 5)],
    "heads": [(4, 4, 4), (4, 2, 2), (4, 3, 3), (4, 2, 4), (4, 8, 8), (4, 1, 1), (2, 4, 4)],
    "gqa": [False, True],
    "batches": [(2, 2), (1, 1), (2, 1), (1, 2)],
    "head_dims": [(8, 8), (6, 8), (8, 6)],
    "unit_stride": ["qkv", "q", "k", "v"],
    "mask": [None, (5, 7), (1, 7), (5, 1), (3, 7), (2, 4, 5, 7), (1, 1, 1, 7), (2, 3, 5, 7), (1, 5, 7), (7,),
             (), (1, 1, 1, 5, 7), (2, 1, 5, 7), (2, 4, 1, 1)],
    "mask_kind": ["bool", "float", "float_grad"],
    "dropout": [0.0, 0.2, -0.1],
    "causal": [False, True],
}


def _mirror_inputs(rng: random.Random):
    """One call for the CPU flash mirror: a call flash takes, with 0-3 of its conditions changed."""
    pick = {name: values[0] for name, values in MIRROR_FACTORS.items()}
    for name in rng.sample(sorted(MIRROR_FACTORS), rng.choice([0, 1, 1, 2, 2, 3])):
        pick[name] = rng.choice(MIRROR_FACTORS[name])
    if pick["mask"] is not None and rng.random() < 0.5:
        pick["mask"] = rng.choice(MIRROR_FACTORS["mask"])
    nd, dtype, (lq, lk), (hq, hk, hv) = pick["nd"], pick["dtype"], pick["lens"], pick["heads"]
    (bk, bv), (dk, dv), b, d = pick["batches"], pick["head_dims"], 2, 8

    def t(bb, h, length, dd, seed, unit):
        shape = {4: (bb, h, length, dd), 3: (bb * h, length, dd), 5: (1, bb, h, length, dd)}[nd]
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
        return x if unit else x.transpose(-1, -2).contiguous().transpose(-1, -2)
    us = pick["unit_stride"]
    q = t(b, hq, lq, d, 1, us in ("qkv", "k", "v"))
    k = t(bk, hk, lk, dk, 2, us in ("qkv", "q", "v"))
    v = t(bv, hv, lk, dv, 3, us in ("qkv", "q", "k"))
    mask = None
    if pick["mask"] is not None:
        shape = tuple(lq if s == 5 else lk if s == 7 else s for s in pick["mask"])
        kind = pick["mask_kind"]
        mask = torch.rand(shape) > 0.5 if kind == "bool" else torch.randn(shape).to(
            dtype if dtype.is_floating_point else torch.float32).requires_grad_(kind == "float_grad")
    return q, k, v, mask, pick["dropout"], pick["causal"], pick["gqa"]


def test_cpu_flash_mirror_matches_pytorchs_own_check_on_3000_calls():
    rng = random.Random(0)
    seen = {True: 0, False: 0}
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        for _ in range(3000):
            q, k, v, mask, p, causal, gqa = _mirror_inputs(rng)
            try:
                theirs = int(torch._fused_sdp_choice(q, k, v, mask, p, causal, enable_gqa=gqa)) == \
                    int(SDPBackend.FLASH_ATTENTION)
            except (RuntimeError, IndexError):  # PyTorch's check itself raises (e.g. a 1-D mask)
                theirs = False
            reasons = cpu_flash_reasons(q, k, v, mask, p, gqa)
            seen[theirs] += 1
            assert theirs == (not reasons), (q.shape, k.shape, v.shape, q.dtype, q.stride(), k.stride(),
                                             v.stride(), None if mask is None else (mask.shape, mask.dtype),
                                             p, causal, gqa, reasons)
    assert seen[True] > 500 and seen[False] > 1000  # both answers exercised


# -- output layout ----------------------------------------------------------------------------------------------

LAYOUT_CASES = [c for c in CASES if c not in ("negative_dropout", "mask_1d", "mask_0d")] + ["nanogpt"]


def _nanogpt(dtype, grad, device="cpu"):
    b, t, h, d = 4, 16, 8, 8
    x = torch.randn(b, t, 3 * h * d, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    x.requires_grad_(grad)
    q, k, v = (z.view(b, t, h, d).transpose(1, 2) for z in x.split(h * d, dim=2))
    return q, k, v, {"is_causal": True}


CASES_WITH_NANOGPT = {**CASES, "nanogpt": _nanogpt}


@pytest.mark.parametrize("case_id", LAYOUT_CASES)
def test_restrided_output_has_pytorchs_strides_whoever_wins(case_id):
    for dtype, grad in itertools.product((torch.float32, torch.bfloat16), (False, True)):
        q, k, v, kw = CASES_WITH_NANOGPT[case_id](dtype, grad)
        call = Call(q, k, v, kw.get("attn_mask"), kw.get("dropout_p", 0.0), kw.get("is_causal", False),
                    kw.get("scale"), kw.get("enable_gqa", False), needs_grad=grad)
        pick = pytorch_choice(call)
        if pick is None:
            continue  # F.sdpa raises or runs no backend: autosdpa hands such calls to F.sdpa itself
        ref = F.scaled_dot_product_attention(q, k, v, **kw)
        for name in ("math", "flash"):
            if get_torch(name).not_supported_reasons(call):
                continue
            try:
                raw = get_torch(name).run(q, k, v, **kw)
            except RuntimeError:  # e.g. math refuses is_causal with a mask, which CPU flash takes
                continue
            assert has_order(raw, output_order(call, name)), (case_id, name, raw.stride(), output_order(call, name))
            out = restride(raw, output_strides(call, pick))
            assert out.stride() == ref.stride(), (case_id, dtype, name, pick, out.stride(), ref.stride())
            assert out.is_contiguous() == ref.is_contiguous()
            if kw.get("dropout_p", 0.0) == 0.0 and ref.isfinite().all():  # (CPU flash: NaN for some scales)
                torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2, equal_nan=True)


def test_nanogpt_view_works_whoever_wins():
    q, k, v, kw = _nanogpt(torch.float32, False)
    call = Call(q, k, v, is_causal=True)
    assert pytorch_choice(call) == "flash"
    math_out = get_torch("math").run(q, k, v, **kw)
    with pytest.raises(RuntimeError):
        math_out.transpose(1, 2).view(4, 16, 64)  # the issue: math's contiguous layout breaks the tutorial
    y = restride(math_out, output_strides(call, "flash"))
    torch.testing.assert_close(y.transpose(1, 2).view(4, 16, 64),
                               F.scaled_dot_product_attention(q, k, v, **kw).transpose(1, 2).view(4, 16, 64))


def _layouts():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, 5, 6, generator=g)
    yield base
    for perm in itertools.permutations(range(4)):
        yield base.permute(perm)
        yield base.permute(perm).contiguous().permute(tuple(perm.index(i) for i in range(4)))
    yield base[:, :, :, :3]
    yield base[:, ::2]
    yield base[:1].expand(3, 4, 5, 6)
    yield base[:, :1].expand(3, 4, 5, 6)
    yield torch.randn(1, 4, 1, 6).expand(3, 4, 5, 6)
    yield torch.randn(3, 1, 5, 1).expand(3, 4, 5, 6).transpose(1, 3)
    yield torch.randn(1, 1, 5, 6)
    yield torch.randn(3, 4, 1, 6).transpose(1, 2)
    yield torch.randn(6, 5, 4, 3).permute(3, 2, 1, 0)[:, :, 1:3]
    yield torch.randn(4, 12)[:, ::4].unsqueeze(0)


def test_dense_order_is_the_order_empty_like_allocates():
    for t in _layouts():
        ref = torch.empty_like(t)
        order = dense_order(t.shape, t.stride())
        assert sorted(order) == list(range(t.dim()))
        assert has_order(ref, order), (t.shape, t.stride(), ref.stride(), order)


def test_restride_returns_the_same_tensor_or_a_differentiable_copy():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    assert restride(x, x.stride()) is x
    y = restride(x, order_strides(x.shape, (0, 2, 1, 3)))
    assert y is not x and torch.equal(y, x) and has_order(y, (0, 2, 1, 3))
    assert y.stride() == (60, 5, 15, 1)
    w = torch.randn(2, 3, 4, 5)
    (y * w).sum().backward()
    assert torch.equal(x.grad, w)
    assert restride(y, (60, 5, 15, 1)) is y
    empty = torch.empty(0, 3, 4, 5)
    assert restride(empty, (1, 1, 1, 1)) is empty
    # dims of size 1: a view of the same memory with PyTorch's strides on them
    z = torch.randn(2, 1, 4, 5, requires_grad=True)
    zz = restride(z, (20, 999, 5, 1))
    assert zz.stride() == (20, 999, 5, 1) and zz.data_ptr() == z.data_ptr() and torch.equal(zz, z)
    zz.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


@pytest.mark.parametrize("b,h,lq,transposed", [(2, 1, 8, True), (1, 1, 8, True), (2, 2, 1, True), (1, 2, 8, False),
                                               (2, 1, 8, False), (1, 1, 1, True)])
def test_output_strides_of_size_one_dims_are_pytorchs_whoever_wins(b, h, lq, transposed):
    """F.sdpa's output has exact strides even on dims of size 1 (flash returns empty_like(query)); a forced
    backend that is not PyTorch's pick returns the same strides."""
    import autosdpa

    q = torch.randn(b, lq, h, 4).transpose(1, 2) if transposed else torch.randn(b, h, lq, 4)
    k, v = torch.randn(b, h, 8, 4), torch.randn(b, h, 8, 4)
    odd = torch.randn(b, h, lq, 4).as_strided((b, h, lq, 4), (h * lq * 4, 999 if h == 1 else lq * 4, 4, 1)) \
        if h == 1 else None
    for query in (q, odd) if odd is not None else (q,):
        ref = F.scaled_dot_product_attention(query, k, v)
        for name in ("math", "flash"):
            with autosdpa.backend(name):
                out = autosdpa.sdpa(query, k, v)
            assert out.stride() == ref.stride(), (name, query.stride(), out.stride(), ref.stride())
            torch.testing.assert_close(out, ref)


def test_output_order_knows_pytorchs_backends_only():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError):
        output_order(Call(q, q, q), "triton_flash")


# -- no process-wide state --------------------------------------------------------------------------------------

def _code_names(path: Path) -> set[str]:
    with path.open("rb") as f:
        return {t.string for t in tokenize.tokenize(f.readline) if t.type == tokenize.NAME}


def test_library_never_writes_pytorchs_sdp_flags():
    """No code in the library names a flag setter (strings and comments aside)."""
    src = Path(autosdpa.__file__).parent
    setters = {"_set_sdp_use_flash", "_set_sdp_use_mem_efficient", "_set_sdp_use_math", "_set_sdp_use_cudnn",
               "_set_sdp_use_overrideable", "_set_sdp_priority_order", "enable_flash_sdp",
               "enable_mem_efficient_sdp", "enable_math_sdp", "enable_cudnn_sdp", "sdpa_kernel"}
    found = {str(p.relative_to(src)): _code_names(p) & setters for p in src.rglob("*.py")}
    assert {k: v for k, v in found.items() if v} == {}
    for p in (src / "backends").glob("torch_*.py"):  # nor the warnings module's process-wide filters
        assert "catch_warnings" not in _code_names(p), p


def _all_calls():
    for build in CASES_WITH_NANOGPT.values():
        q, k, v, kw = build(torch.float32, False)
        yield Call(q, k, v, kw.get("attn_mask"), kw.get("dropout_p", 0.0), kw.get("is_causal", False),
                   kw.get("scale"), kw.get("enable_gqa", False))


def test_checks_leave_flags_alone_while_another_thread_holds_sdpa_kernel():
    inside, release, seen = threading.Event(), threading.Event(), []

    def holder():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            inside.set()
            release.wait(10)
            seen.append(torch_flags())

    t = threading.Thread(target=holder)
    t.start()
    assert inside.wait(10)
    try:
        flash_only = (True, False, False, False)
        for call in _all_calls():
            for name in SDP:
                get_torch(name).not_supported_reasons(call)
                assert torch_flags() == flash_only, name
            pytorch_choice(call)
            output_order(call, "flash")
            assert torch_flags() == flash_only
    finally:
        release.set()
        t.join()
    assert seen == [flash_only]
    assert torch_flags() == ALL_ON


def test_two_threads_flags_unchanged_and_sdpa_kernel_runs_what_it_asked_100_times():
    """issue 9 item 3: one thread runs autosdpa's math directly, another F.sdpa under sdpa_kernel(FLASH)."""
    from torch.profiler import ProfilerActivity, profile

    q = torch.randn(1, 2, 8, 16)
    rounds, per_round = 100, 5
    start, done = threading.Barrier(2), threading.Barrier(3)  # done: the main thread checks between rounds
    flags_inside, errors, ops = [], [], {}

    def under_sdpa_kernel():  # one thread for all rounds, so that one profiler sees all its calls
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(rounds):
                    start.wait(10)
                    for _ in range(per_round):
                        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                            flags_inside.append(torch_flags())
                            F.scaled_dot_product_attention(q, q, q)
                    done.wait(10)
            for e in prof.events():
                ops[e.name] = ops.get(e.name, 0) + 1
        except Exception as e:  # reported below
            errors.append(e)

    def direct_math():
        start.wait(10)
        for _ in range(per_round):
            autosdpa.backends.get("math").run(q, q, q)
        done.wait(10)

    kernel_thread = threading.Thread(target=under_sdpa_kernel)
    kernel_thread.start()
    after_rounds = []
    for _ in range(rounds):
        t = threading.Thread(target=direct_math)
        t.start()
        done.wait(10)
        after_rounds.append(torch_flags())  # both threads are between rounds: nobody inside sdpa_kernel
        t.join()
    kernel_thread.join()
    assert errors == []
    assert after_rounds == [ALL_ON] * rounds
    assert torch_flags() == ALL_ON
    assert flags_inside == [(True, False, False, False)] * (rounds * per_round)
    assert ops.get("aten::_scaled_dot_product_flash_attention_for_cpu") == rounds * per_round
    assert "aten::_scaled_dot_product_attention_math" not in ops


# -- empty inputs and version probes ----------------------------------------------------------------------------

def test_empty_rule_is_the_one_this_pytorch_has():
    assert torch_ops.empty_rule() in ("v_or_lq", "any", "none")
    q, k, v, _ = CASES["empty_lq"](torch.float32, True)
    out = F.scaled_dot_product_attention(q, k, v)
    assert (type(out.grad_fn).__name__ == "AddBackward0") == (torch_ops.empty_rule() != "none")


# -- CUDA (run with -m gpu on a GPU machine) --------------------------------------------------------------------

CUDA_CASES = ["square", "lq_ne_lk", "gqa", "gqa_causal", "mask_bool_2d", "mask_bool_4d_broadcast", "mask_float_2d",
              "mask_bool_empty_row", "mask_gqa", "causal_upper_left_lq_ne_lk", "bias_lower_right_square",
              "mask_float32_any_dtype", "mask_requires_grad", "causal_square", "causal_upper_left_lq_ne_lk",
              "bias_upper_left", "bias_lower_right", "bias_lower_right_gqa", "bias_lower_right_dropout",
              "scale_negative", "dropout", "dropout_causal_mask", "blhd", "split_qkv", "expanded_batch",
              "dv_ne_d", "d_odd", "lq_1", "3d", "empty_lq", "empty_lk"]


@pytest.mark.gpu
@pytest.mark.parametrize("case_id", CUDA_CASES)
def test_direct_run_is_sdpa_kernel_on_cuda(case_id):
    for dtype, grad in itertools.product((torch.bfloat16, torch.float32), (False, True)):
        q, k, v, kw = CASES[case_id](dtype, grad, device="cuda")
        for name in SDP:
            ours, theirs = _ours(name, q, k, v, kw), _theirs(name, q, k, v, kw)
            where = f"{name} {case_id} {dtype} grad={grad}"
            if theirs[0] is not None:  # PyTorch refuses: autosdpa must refuse or (never silently) agree
                assert ours[0] is not None or get_torch(name).not_supported_reasons(
                    Call(q, k, v, kw.get("attn_mask"), kw.get("dropout_p", 0.0), kw.get("is_causal", False),
                         kw.get("scale"), kw.get("enable_gqa", False))), where
                continue
            _assert_identical(ours, theirs, where, grad_tol=0.0 if name == "math" else 2e-2)
            _assert_identical(_ours_runner(name, q, k, v, kw), theirs, where + " runner",
                              grad_tol=0.0 if name == "math" else 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("case_id", CUDA_CASES + ["nanogpt"])
def test_output_order_and_restride_on_cuda(case_id):
    q, k, v, kw = CASES_WITH_NANOGPT[case_id](torch.bfloat16, False, device="cuda")
    call = Call(q, k, v, kw.get("attn_mask"), kw.get("dropout_p", 0.0), kw.get("is_causal", False),
                kw.get("scale"), kw.get("enable_gqa", False))
    pick = pytorch_choice(call)
    if pick is None:
        return
    ref = F.scaled_dot_product_attention(q, k, v, **kw)
    for name in SDP:
        if get_torch(name).not_supported_reasons(call):
            continue
        raw = get_torch(name).run(q, k, v, **kw)
        padded_flash = name == "flash" and q.shape[-1] % 8  # F.sdpa returns a slice of a padded buffer
        assert padded_flash or has_order(raw, output_order(call, name)), (case_id, name, raw.stride())
        out = restride(raw, output_strides(call, pick))
        ref_padded = pick == "flash" and q.shape[-1] % 8
        assert ref_padded or strides_match(out, ref), (case_id, name, pick, out.stride(), ref.stride())


@pytest.mark.gpu
@pytest.mark.parametrize("flags", [None, [SDPBackend.MATH], [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
                                   [SDPBackend.CUDNN_ATTENTION], [SDPBackend.FLASH_ATTENTION]],
                         ids=["default", "math", "efficient+math", "cudnn", "flash"])
def test_pytorch_choice_names_what_pytorch_runs_on_cuda(flags):
    for case_id in CUDA_CASES:
        for dtype in (torch.bfloat16, torch.float32):
            _check_choice_is_what_runs(case_id, dtype, flags, *CASES[case_id](dtype, True, device="cuda"))


# -- CUDA preprocessing, checked on CPU with stand-in kernels ----------------------------------------------------

class _FakeKernels:
    """Stand-ins for the CUDA ops: record what they receive and compute it with PyTorch's math op."""

    def __init__(self):
        self.calls = []

    def _ref(self, q, k, v, bias, dropout_p, is_causal, scale, name, **extra):
        self.calls.append(dict(name=name, q=q, k=k, v=v, bias=bias, dropout_p=dropout_p, is_causal=is_causal,
                               scale=scale, **extra))
        return torch._scaled_dot_product_attention_math(q, k, v, bias, dropout_p, is_causal, scale=scale,
                                                        enable_gqa=q.shape[1] != k.shape[1])[0]

    def flash(self, q, k, v, dropout_p, is_causal, return_debug_mask, scale=None):
        return (self._ref(q, k, v, None, dropout_p, is_causal, scale, "flash"),)

    def efficient(self, q, k, v, bias, lse, dropout_p, is_causal, scale=None):
        return (self._ref(q, k, v, bias, dropout_p, is_causal, scale, "efficient", lse=lse),)

    def cudnn(self, q, k, v, bias, lse, dropout_p, is_causal, return_debug_mask, scale=None):
        return (self._ref(q, k, v, bias, dropout_p, is_causal, scale, "cudnn", lse=lse),)

    def efficient_forward(self, q, k, v, bias, cu_q, cu_k, max_q, max_k, dropout_p, mask_type, lse, scale=None,
                          seqlen_k=None):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        lq, lk = q.shape[-2], k.shape[-2]
        keep = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
        out = self._ref(q, k, v, bool_mask_to_float(keep, q.dtype), dropout_p, False, scale, "efficient_lr",
                        mask_type=mask_type, lse=lse)
        return (out.transpose(1, 2),)


def bool_mask_to_float(m, dtype):
    return torch.zeros(m.shape, dtype=dtype).masked_fill(~m, float("-inf"))


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = _FakeKernels()
    monkeypatch.setattr(torch, "_scaled_dot_product_flash_attention", fake.flash)
    monkeypatch.setattr(torch, "_scaled_dot_product_efficient_attention", fake.efficient)
    monkeypatch.setattr(torch, "_scaled_dot_product_cudnn_attention", fake.cudnn)
    monkeypatch.setattr(torch_ops, "_aten", type("A", (), {"_efficient_attention_forward": fake.efficient_forward}))
    return fake


def _cuda(name, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
    """What ``torch_ops.run`` does for CUDA backend ``name`` past validation: its guard, then its core."""
    guard, core = torch_ops._CUDA[name]
    guard(q, k, v, mask, dropout_p, is_causal, enable_gqa)
    return core(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa)


def _math_ref(q, k, v, **kw):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, **kw)


@pytest.mark.parametrize("d", [8, 5, 12, 64])
def test_cuda_flash_pads_head_dim_with_the_unpadded_scale(fake_cuda, d):
    q, k, v = qkv(torch.float32, True, hkv=2, d=d)
    out = _cuda("flash", q, k, v, None, 0.0, False, None, True)
    got = fake_cuda.calls[-1]
    assert got["q"].shape[-1] % 8 == 0 and got["v"].shape[-1] % 8 == 0
    assert got["scale"] == 1.0 / d ** 0.5
    assert out.shape == q.shape
    torch.testing.assert_close(out, _math_ref(q, k, v, enable_gqa=True))
    out.sum().backward()  # gradients flow back through the padding
    assert q.grad.shape == q.shape


def test_cuda_flash_refuses_what_pytorch_would_not_run_with_it(fake_cuda):
    q, k, v = qkv(torch.float16, False)
    with pytest.raises(RuntimeError):
        _cuda("flash", q, k, v, None, 0.0, True, None, False)  # causal with Lq != Lk
    with pytest.raises(RuntimeError):
        _cuda("flash", q, k, v, torch.ones(LQ, LK, dtype=torch.bool), 0.0, False, None, False)
    q2, k2, v2 = qkv(torch.float16, False, hkv=2)
    with pytest.raises(RuntimeError):
        _cuda("flash", q2, k2, v2, None, 0.0, False, None, False)  # GQA without enable_gqa
    with pytest.raises(RuntimeError):
        _cuda("efficient", q2, k2, v2, None, 0.0, False, None, True)  # efficient takes no GQA
    assert fake_cuda.calls == []


@pytest.mark.parametrize("mask_shape", [(LQ, LK), (B, 1, 1, LK), (B, H, LQ, LK), (1, LQ, LK)])
def test_cuda_efficient_aligns_and_expands_the_mask(fake_cuda, mask_shape):
    q, k, v = qkv(torch.float32, True)
    mask = _mask(mask_shape, "bool", torch.float32)
    out = _cuda("efficient", q, k, v, mask, 0.0, False, 0.5, False)
    got = fake_cuda.calls[-1]
    bias = got["bias"]
    assert bias.shape == (B, H, LQ, LK) and bias.dtype == q.dtype
    assert bias.stride(-1) == 1 and all(s % 8 == 0 for s in bias.stride()[:-1])
    assert got["lse"] is True and got["scale"] == 0.5
    torch.testing.assert_close(out, _math_ref(q, k, v, attn_mask=mask, scale=0.5))
    with torch.no_grad():
        _cuda("efficient", q, k, v, mask, 0.0, False, None, False)
    assert fake_cuda.calls[-1]["lse"] is False  # logsumexp only when a gradient can be asked for


def test_cuda_cudnn_converts_bool_masks_with_its_own_fill(fake_cuda):
    q, k, v = qkv(torch.bfloat16, False)
    mask = _mask((LQ, LK), "bool", torch.float32)
    _cuda("cudnn", q, k, v, mask, 0.0, False, None, False)
    bias = fake_cuda.calls[-1]["bias"]
    assert bias.dtype == torch.bfloat16 and bias.shape == mask.shape
    assert set(bias.float().unique().tolist()) == {0.0, torch_ops._CUDNN_BOOL_FILL}


def test_cuda_lower_right_bias_takes_flash_then_efficient_paths(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda")))
    q, k, v = qkv(torch.float32, False, d=12)
    bias = causal_lower_right(LQ, LK)
    torch_ops.run("flash", q, k, v, bias)
    got = fake_cuda.calls[-1]  # flash's own causal flag (lower-right in that kernel), no mask, padded
    assert got["name"] == "flash" and got["is_causal"] is True and got["q"].shape[-1] == 16
    assert got["scale"] == 1.0 / 12 ** 0.5
    out = torch_ops.run("efficient", q, k, v, bias, scale=0.25)
    got = fake_cuda.calls[-1]
    assert got["name"] == "efficient_lr" and got["mask_type"] == 2 and got["scale"] == 0.25
    torch.testing.assert_close(out, _math_ref(q, k, v, attn_mask=lower_right_reference(LQ, LK), scale=0.25))


def lower_right_reference(lq, lk):
    return torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)


def test_cuda_runners_are_set_up_only_for_calls_their_guard_lets_through(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda")))
    q, k, v = qkv(torch.float16, False)  # Lq != Lk
    assert torch_ops.runner_for("flash", q, k, v, None, 0.0, True) is None   # causal, Lq != Lk: refused
    assert torch_ops.runner_for("efficient", *qkv(torch.float16, False, hkv=2), enable_gqa=True) is None
    run = torch_ops.runner_for("flash", q, k, v)
    assert run is not None
    out = run(q, k, v, None, 0.0, False, None, False)
    assert fake_cuda.calls[-1]["name"] == "flash" and out.shape == q.shape
    torch.testing.assert_close(out, _math_ref(q.float(), k.float(), v.float()).half(), atol=2e-3, rtol=2e-3)
