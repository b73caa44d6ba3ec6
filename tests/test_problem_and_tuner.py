"""Problem keys, and the tuner's reference check: a wrong or failing backend is rejected, never the winner."""
import pytest
import torch
import torch.nn.functional as F

import autosdpa
from autosdpa.backends import Backend, Call, register, unregister
from autosdpa.forms import synthetic_call
from autosdpa.problem import Problem, bucket
from autosdpa.reference import reference_attention


def test_bucket():
    assert [bucket(n) for n in (1, 7, 16, 17, 100, 128, 129, 1000)] == [1, 7, 16, 32, 128, 128, 256, 1024]
    assert bucket(1000, None) == 1000


def test_key_roundtrip_and_fields():
    q, k, v = torch.randn(3, 8, 100, 64), torch.randn(3, 2, 300, 64), torch.randn(3, 2, 300, 32)
    m = torch.ones(3, 1, 1, 300, dtype=torch.bool)
    p = Problem.from_call(Call(q, k, v, m, enable_gqa=True))
    assert p.key == ("fwd|fp32|B=3|Hq=8|Hkv=2|Lq=128|Lk=512|D=64|Dv=32|nocausal|mask=bool:B11K|drop=0|gqa=1|"
                     "layout=bhld|det=0")
    assert Problem.parse(p.key) == p
    t = torch.randn(2, 10, 4, 16).transpose(1, 2)
    assert Problem.from_call(Call(t, t, t, is_causal=True, needs_grad=True)).key.startswith("fwdbwd|")
    assert "layout=blhd" in Problem.from_call(Call(t, t, t)).key


@pytest.mark.parametrize("bad", ["", "fwd|fp32", "fwd|fp32|B=1|Hq=1|Hkv=1|Lq=1|Lk=1|D=8|Dv=8|causal|mask=none|"
                                 "drop=0|gqa=0|layout=bhld|det=0|extra",
                                 "fwd|fp99|B=1|Hq=1|Hkv=1|Lq=1|Lk=1|D=8|Dv=8|causal|mask=none|drop=0|gqa=0|layout=bhld|det=0",
                                 "fwd|fp32|B=-1|Hq=1|Hkv=1|Lq=1|Lk=1|D=8|Dv=8|causal|mask=none|drop=0|gqa=0|layout=bhld|det=0",
                                 "fwd|fp32|B=1|Hq=1|Hkv=1|Lq=1|Lk=1|D=8|Dv=8|causal|mask=x'; DROP TABLE--|drop=0|gqa=0|layout=bhld|det=0",
                                 "fwd|fp32|B=1|Hq=3|Hkv=2|Lq=1|Lk=1|D=8|Dv=8|causal|mask=none|drop=0|gqa=1|layout=bhld|det=0"])
def test_parse_rejects_malformed(bad):
    with pytest.raises(ValueError):
        Problem.parse(bad)


@pytest.mark.parametrize("key", [
    "fwd|fp32|B=2|Hq=4|Hkv=2|Lq=16|Lk=32|D=16|Dv=16|causal|mask=none|drop=0|gqa=1|layout=bhld|det=0",
    "fwdbwd|fp64|B=1|Hq=2|Hkv=2|Lq=8|Lk=8|D=8|Dv=8|nocausal|mask=float:1HQK|drop=0|gqa=0|layout=blhd|det=0",
    "fwd|fp32|B=2|Hq=1|Hkv=1|Lq=8|Lk=16|D=8|Dv=8|causal_br|mask=none|drop=0|gqa=0|layout=nd3|det=0",
    "fwd|fp32|B=2|Hq=2|Hkv=2|Lq=8|Lk=16|D=8|Dv=8|nocausal|mask=bool:B11K|drop=0|gqa=0|layout=strided|det=0",
    "fwd|fp32|B=3|Hq=1|Hkv=1|Lq=8|Lk=16|D=8|Dv=8|nocausal|mask=float:B1QK|drop=0|gqa=0|layout=nd3|det=0",
    "fwd|fp32|B=2|Hq=4|Hkv=2|Lq=8|Lk=16|D=8|Dv=8|nocausal|mask=bool:BHQK|drop=0|gqa=1|layout=nd5+|det=0",
])
def test_make_call_reproduces_the_key(key):
    p = Problem.parse(key)
    call = synthetic_call(p, "cpu")
    assert Problem.from_call(call).key == key
    out = autosdpa.sdpa(*call.args()[:3], attn_mask=call.attn_mask, is_causal=call.is_causal,
                        enable_gqa=call.enable_gqa)
    ref = F.scaled_dot_product_attention(*call.args()[:3], attn_mask=call.attn_mask, is_causal=call.is_causal,
                                         enable_gqa=call.enable_gqa)
    torch.testing.assert_close(out, ref)


def test_reference_matches_math_backend():
    from torch.nn.attention.bias import causal_lower_right
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 13, 16), torch.randn(2, 2, 13, 8)
    for kw in (dict(is_causal=True), dict(attn_mask=causal_lower_right(9, 13)),
               dict(attn_mask=torch.randn(9, 13)), dict(attn_mask=torch.rand(2, 1, 9, 13) > 0.5)):
        ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=0.2, **kw)
        got = reference_attention(Call(q, k, v, enable_gqa=True, scale=0.2, **kw), chunk_bytes=1024)
        torch.testing.assert_close(got.float(), ref, atol=1e-5, rtol=1e-5)


class _Fake(Backend):
    def __init__(self, name, fn):
        self.name, self._fn = name, fn

    def not_supported_reasons(self, call):
        return []

    def run(self, q, k, v, m=None, dp=0.0, ic=False, sc=None, gqa=False):
        return self._fn(q, k, v, m, dp, ic, sc, gqa)


@pytest.fixture
def fakes():
    made = []

    def add(name, fn):
        made.append(register(_Fake(name, fn)))
    yield add
    for b in made:
        unregister(b.name)


def test_wrong_fast_backend_is_rejected_never_the_winner(fakes):
    fakes("fast_but_wrong", lambda q, k, v, *a: torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype))
    fakes("broken", lambda *a: (_ for _ in ()).throw(RuntimeError("kernel exploded")))
    fakes("oom", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")))
    q = torch.randn(2, 2, 64, 32)
    out = autosdpa.sdpa(q, q, q)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))
    d = autosdpa.explain(q, q, q)
    # fast_but_wrong returns at once: it would win if its output were not checked
    assert d.backend not in ("fast_but_wrong", "broken", "oom") and d.timings[d.backend] is not None
    assert "wrong result" in d.rejected["fast_but_wrong"]
    assert "kernel exploded" in d.rejected["broken"]
    assert d.rejected["oom"] == "out of memory"
    assert d.timings["fast_but_wrong"] is None


def test_our_backend_can_win_and_runs(fakes):
    seen = []
    q = torch.randn(1, 2, 32, 16)
    answer = F.scaled_dot_product_attention(q, q, q)

    def fast(q, k, v, m, dp, ic, sc, gqa):  # right for these inputs, and ~50x faster than math: it must win
        seen.append(q.shape)
        return answer
    fakes("speedy", fast)
    with autosdpa.backend("speedy", "math"):
        d = autosdpa.explain(q, q, q)
    assert d.timings["speedy"] is not None and d.timings["math"] is not None
    assert d.backend == "speedy" and d.source == "tuned"
    with autosdpa.backend("speedy"):
        seen.clear()
        autosdpa.sdpa(q, q, q)
        assert seen == [q.shape]
        # a k/v the plan was not made for (different dtype) goes to PyTorch, which raises its own error
        with pytest.raises(RuntimeError):
            autosdpa.sdpa(q, q.double(), q)
