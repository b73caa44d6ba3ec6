"""The dispatcher's bucket key (every new length of a decode loop computes one): its inlined arithmetic equals
the problem key's own rules (``problem.bucket``, ``layout_class``), and two calls share a bucket key only
when they share a problem key, so a plan is never shared across problems."""
import itertools
import math

import torch
from hypothesis import given, settings, strategies as st

from autosdpa import fastkey, forms
from autosdpa.forms import dense
from autosdpa.problem import DECODE_LQ, bucket, layout_class


def _reference(fk, q, m, threshold):
    """The bucket key written with the problem key's helpers."""
    qs, ks, vs = fk[0], fk[1], fk[2]
    if not (len(qs) == len(ks) == len(vs) >= 3) or ks[-2] != vs[-2] or qs[-1] != ks[-1] or 0 in qs or 0 in ks:
        return None
    lq, lk = qs[-2], ks[-2]
    batch = math.prod(qs[:-2] if len(qs) == 3 else qs[:-3])
    heads = () if len(qs) == 3 else (qs[-3], ks[-3], vs[-3], qs[:-3] == ks[:-3] == vs[:-3])
    shape = (len(qs), bucket(batch, threshold), heads, bucket(lq, threshold),
             bucket(lk, 0 if threshold is not None and lq <= DECODE_LQ else threshold), qs[-1], vs[-1])
    return (shape, layout_class(q), None if m is None else dense._mask_bucket(m), *fk[3:5], *fk[6:])


SIZES = st.sampled_from([1, 2, 3, 15, 16, 17, 31, 33, 100, 300])


def build(nd, b, h, hk, lq, lk, d, dk, dv, lead2, blhd, lv_extra, mask, causal, gqa, kb1=False):
    def make(heads, length, dim, batch=b):
        lead = [batch] if nd == 4 else [batch, lead2] if nd == 5 else []
        return torch.empty(batch * heads, length, dim) if nd == 3 else torch.empty(*lead, heads, length, dim)

    q = torch.empty(b, lq, h, d).transpose(1, 2) if nd == 4 and blhd else make(h, lq, d)
    kb = 1 if kb1 else b  # a key/value batch of 1 (F.sdpa broadcasts it on some backends)
    k, v = make(hk, lk, dk, kb), make(hk, lk + lv_extra, dv, kb)
    m = None if mask is None else (torch.ones(lq, lk, dtype=torch.bool) if mask == "bool"
                                   else torch.zeros(1, 1, lq, lk))
    return q, k, v, m, causal and m is None, gqa


PARAMS = st.fixed_dictionaries(dict(
    nd=st.sampled_from([3, 4, 4, 5]), b=SIZES, h=st.sampled_from([1, 2, 8]), hk=st.sampled_from([1, 2, 8]),
    lq=SIZES, lk=st.sampled_from([0, 1, 5, 16, 17, 64, 65, 300]), d=st.sampled_from([8, 16]),
    dk=st.sampled_from([8, 16]), dv=st.sampled_from([8, 16]), lead2=st.sampled_from([1, 2]), blhd=st.booleans(),
    lv_extra=st.sampled_from([0, 0, 0, 1]), mask=st.sampled_from([None, "bool", "float"]), causal=st.booleans(),
    gqa=st.booleans(), kb1=st.booleans()))


def test_bucket_key_follows_the_problem_keys_rules():
    """Every combination of the sizes around the thresholds (16, and DECODE_LQ = 16), layouts and masks."""
    n = 0
    for nd, b, kb1, lq, lk, blhd, mask, (h, hk) in itertools.product(
            (3, 4, 5), (1, 4, 16, 17, 40), (False, True), (1, 4, 15, 16, 17, 33), (1, 5, 16, 17, 65, 300),
            (False, True), (None, "bool", "float"), ((8, 8), (8, 2))):
        q, k, v, m, causal, gqa = build(nd, b, h, hk, lq, lk, 16, 16, 8, 2, blhd, 0, mask, False, hk != h, kb1)
        fk = fastkey.py_key(q, k, v, m, 0.0, causal, gqa, 0)
        for threshold in (None, 0, 4, 16, 64):
            got = dense.bucket_key(fk, q, k, v, m, threshold)
            want = _reference(fk, q, m, threshold)
            assert got == want and hash(got) == hash(want), (q.shape, k.shape, mask, threshold)
            n += want is not None
    assert n > 10_000  # most combinations are valid calls, keyed


@settings(max_examples=200, deadline=None)
@given(PARAMS, st.sampled_from([None, 0, 4, 16, 64]))
def test_odd_calls_key_as_the_rules_say(p, threshold):
    """Mismatched head dims or lengths, empty keys: None exactly where the rules say."""
    q, k, v, m, causal, gqa = build(**p)
    fk = fastkey.py_key(q, k, v, m, 0.0, causal, gqa, 0)
    assert dense.bucket_key(fk, q, k, v, m, threshold) == _reference(fk, q, m, threshold)


def _keys(p, threshold):
    q, k, v, m, causal, gqa = build(**p)
    call = forms.make_call(q, k, v, m, 0.0, causal, None, gqa)
    bk = dense.bucket_key(fastkey.py_key(q, k, v, m, 0.0, causal, gqa, 0), q, k, v, m, threshold)
    if bk is None or call is None or dense.invalid_reason(call) or dense.degenerate_reason(call):
        return None
    return bk, dense.problem_of(call, threshold).key


@settings(max_examples=300, deadline=None)
@given(PARAMS, st.sampled_from(["b", "lq", "lk"]), st.integers(1, 300), st.sampled_from([None, 16]))
def test_one_bucket_key_means_one_problem(p, field, size, threshold):
    """A call and the same call with its batch or a length changed: the same bucket key exactly when the same
    problem key."""
    a, b = _keys(p, threshold), _keys({**p, field: size}, threshold)
    if a is not None and b is not None:
        assert (a[0] == b[0]) == (a[1] == b[1])
