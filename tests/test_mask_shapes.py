"""Every mask shape PyTorch broadcasts is decided once and served from the cache afterwards, with F.sdpa's
result. Per-head masks (T5's position bias (1, H, Lq, Lk), ALiBi, x-transformers' expanded (B, H, Lq, Lk)
padding, (B, H, 1, Lk)) used to fail the partial reference check with a broadcasting error, be filed as
"invalid" and be tuned again on every call."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import autosdpa
from autosdpa import checks
from autosdpa.forms import dense
from autosdpa.dispatch import Dispatcher, dispatcher

B, H, L, D = 2, 4, 24, 8


def _mask_shapes():
    """2-D, 3-D and 4-D shapes with each dim 1 or full (3-D masks broadcast as (1, H|1, Lq|1, Lk))."""
    shapes = [(L, L), (1, L), (L, 1)]
    shapes += [(h, lq, L) for h in (1, H) for lq in (1, L)]
    shapes += [(b, h, lq, L) for b, h, lq in itertools.product((1, B), (1, H), (1, L))]
    return shapes


def _mask(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        m = torch.rand(shape, generator=g) > 0.3
        m[..., 0] = True  # no fully masked rows: every backend agrees on them only up to NaN vs 0
        return m
    return torch.randn(shape, generator=g)


@pytest.fixture
def checked_in_parts(monkeypatch):
    """Make the checker cut even these small calls into parts (batch entries x kv heads), as it does for
    large ones: that is where per-head masks were mis-sliced."""
    monkeypatch.setattr(checks, "CHECK_WORK", 1)
    monkeypatch.setattr(checks, "CHECK_SHARE", 1 << 30)


@pytest.fixture
def decisions(monkeypatch):
    """Counts the dispatcher's decisions (first-sight work) per problem key."""
    seen = []
    real = Dispatcher.decide

    def counting(self, call, policy, **kw):
        out = real(self, call, policy, **kw)
        seen.append(out[0])
        return out
    monkeypatch.setattr(Dispatcher, "decide", counting)
    return seen


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32], ids=["bool", "float"])
@pytest.mark.parametrize("shape", _mask_shapes(), ids=lambda s: "x".join(map(str, s)))
def test_every_mask_shape_is_decided_once_and_served_from_cache(shape, dtype, checked_in_parts, decisions):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    for seed in range(3):  # new mask values each call, as a model's layers and steps give
        m = _mask(shape, dtype, seed)
        out = autosdpa.sdpa(q, k, v, attn_mask=m)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                                   atol=1e-5, rtol=1e-5)
    assert len(decisions) == 1, [d.source for d in decisions]
    assert decisions[0].source != "invalid", decisions[0].reason
    assert not decisions[0].rejected.get(decisions[0].backend)


@pytest.mark.parametrize("expand", [(B, H, L, L), (B, H, 1, L)])
def test_expanded_mask_views_are_decided_once(expand, checked_in_parts, decisions):
    """x-transformers expands a (B, 1, 1, Lk) padding mask to every head: a view with zero strides."""
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    for seed in range(3):
        m = _mask((B, 1, 1, L), torch.bool, seed).expand(*expand)
        torch.testing.assert_close(autosdpa.sdpa(q, k, v, attn_mask=m),
                                   F.scaled_dot_product_attention(q, k, v, attn_mask=m), atol=1e-5, rtol=1e-5)
    assert len(decisions) == 1 and decisions[0].source != "invalid", decisions[0].reason


def test_the_check_compares_each_block_with_its_own_mask_slice(checked_in_parts):
    """A backend that applies a per-head mask to the wrong heads is caught by the partial check."""
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    m = _mask((1, H, L, L), torch.float32, 0) * 4
    call = autosdpa.backends.Call(q, k, v, m)
    check = checks.Check(call, None)
    assert check.part is not None and check.part.blocks[-1].h == H - 1  # a block that is not (0, 0)
    right = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    wrong = F.scaled_dot_product_attention(q, k, v, attn_mask=m.flip(1))
    assert check.judge(right, ())[1] is None
    assert "wrong result" in check.judge(wrong, ())[1]


def test_inputs_the_reference_rejects_are_not_decided_again_each_call(monkeypatch, decisions):
    """Whatever the reference rejects is settled for that fast key: the next call does not tune again."""
    def broken(*a, **kw):
        raise RuntimeError("the reference cannot take these")
    monkeypatch.setattr(dense, "reference", broken)
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    m = _mask((B, H, L, L), torch.float32, 0)
    for _ in range(3):
        torch.testing.assert_close(autosdpa.sdpa(q, k, v, attn_mask=m),
                                   F.scaled_dot_product_attention(q, k, v, attn_mask=m), atol=1e-5, rtol=1e-5)
    assert [d.source for d in decisions] == ["invalid"]
    assert dispatcher.cached_plans()  # the outcome is cached under the fast key
