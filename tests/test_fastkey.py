"""The C hot path (autosdpa/_fastkey.c): the same key as the Python one, the same results, no leaked references,
and the Python path wherever it is switched off or not built."""
from __future__ import annotations

import shutil
import sys
import sysconfig
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import autosdpa
from autosdpa import dispatch, fastkey

needs_native = pytest.mark.skipif(not fastkey.native_available(),
                                  reason=f"C fast key unavailable: {fastkey.describe()}")


def _compiler() -> str | None:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc)


def test_the_c_fast_key_is_built_wherever_a_c_compiler_is():
    """CI has a compiler: a change that breaks the extension's build or its check against py_key fails here."""
    if _compiler() is None:
        pytest.skip("no C compiler: autosdpa runs its Python hot path")
    assert fastkey.native_available(), fastkey.describe()
    assert dispatch._hit is not None and dispatch._key is not fastkey.py_key


class _Sub(torch.Tensor):
    pass


def _tensor(shape, dtype, grad, kind):
    t = torch.zeros(shape, dtype=dtype)
    grad = grad and dtype.is_floating_point
    if kind == "parameter":
        return torch.nn.Parameter(t, requires_grad=grad)
    if kind == "subclass":
        t = t.as_subclass(_Sub)
    return t.requires_grad_(grad)


@st.composite
def key_args(draw):
    dims = draw(st.integers(2, 5))
    shape = tuple(draw(st.integers(0, 4)) for _ in range(dims))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64]))
    kinds = st.sampled_from(["plain", "plain", "plain", "parameter", "subclass"])
    q, k, v = (_tensor(shape, dtype, draw(st.booleans()), draw(kinds)) for _ in range(3))
    L = shape[-2] if len(shape) >= 2 else 1
    mask = draw(st.sampled_from(["none", "bool", "float", "grad", "ul", "lr", "list", "subclass"]))
    m = {"none": None, "bool": torch.ones(L, L, dtype=torch.bool), "float": torch.zeros(1, L, L),
         "grad": torch.zeros(L, L, requires_grad=True), "ul": causal_upper_left(L, L),
         "lr": causal_lower_right(L, L + 1), "list": [[True]],
         "subclass": torch.zeros(L, L).as_subclass(_Sub)}[mask]
    odd = st.sampled_from([None, "x", 1, 0])
    dp = draw(st.one_of(st.sampled_from([0.0, 0.1, 0]), odd))
    ic = draw(st.one_of(st.booleans(), odd))
    gqa = draw(st.one_of(st.booleans(), odd))
    return (q, k, v, m, dp, ic, gqa, draw(st.integers(0, 3)))


def _key_or_error(fn, args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001  (the type is what must agree)
        return type(e)


@needs_native
@settings(max_examples=300, deadline=None)
@given(args=key_args(), flags=st.lists(st.booleans(), min_size=5, max_size=5))
def test_the_c_key_equals_the_python_key(args, flags):
    """Equal and equally hashed (a plan made on either path is found by the other), or the same error."""
    on = [b for b, f in zip([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
                             SDPBackend.CUDNN_ATTENTION], flags) if f]
    det = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(flags[4], warn_only=True)
        with sdpa_kernel(on or [SDPBackend.MATH]):
            got, want = _key_or_error(dispatch._key, args), _key_or_error(fastkey.py_key, args)
    finally:
        torch.use_deterministic_algorithms(det)
    assert got == want
    if isinstance(want, tuple):
        assert hash(got) == hash(want)
        assert [type(x) for x in got] == [type(x) for x in want]


def test_a_non_tensor_query_raises_what_the_python_key_raises():
    for native in (True, False):
        with pytest.raises(AttributeError):
            fastkey.key_function(native)(None, None, None, None, 0.0, False, False, 0)


@needs_native
def test_the_c_functions_check_their_arguments():
    from autosdpa import _fastkey

    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(TypeError):
        _fastkey.key(x, x, x)
    with pytest.raises(TypeError):
        _fastkey.hit(x, x, x)
    with pytest.raises(TypeError, match="not a C getter"):  # a PyTorch whose Tensor.shape is a Python property
        flags = tuple(fastkey.FLAG_GETTERS) + (torch.are_deterministic_algorithms_enabled,)
        _fastkey.init(torch.Tensor, property(lambda t: t.size()), torch.Tensor.dtype, torch.Tensor.requires_grad,
                      torch.Tensor.get_device, flags, fastkey.py_key, fastkey.mask_sig)
    # a failed init leaves the last good one in place
    assert _fastkey.key(x, x, x, None, 0.0, False, False, 0) == fastkey.py_key(x, x, x, None, 0.0, False, False, 0)


def _call_variants(q, k, v):
    L = q.shape[-2]
    yield (q, k, v), {}
    yield (q, k, v), {"is_causal": True}
    yield (q, k, v, torch.ones(L, L, dtype=torch.bool)), {}
    yield (q, k, v), {"scale": 0.5}
    yield (q, k, v), {"dropout_p": 0}  # an int: the full argument list, not the defaults' shortcut
    yield (q, k, v, None, 0.0, False), {"enable_gqa": False}
    yield (q, k, v), {"attn_mask": causal_lower_right(L, L)}


@needs_native
@pytest.mark.parametrize("forced", [None, "math"])
def test_the_c_hit_path_gives_what_the_python_path_and_f_sdpa_give(forced, monkeypatch):
    """Hits through C (None plans and Plans), then the same calls through the Python path: bitwise equal."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=g) for _ in range(3))
    ctx = autosdpa.backend(forced) if forced else sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
    with ctx:
        for args, kw in _call_variants(q, k, v):
            autosdpa.sdpa(*args, **kw)  # first sight (Python path)
            hits = [autosdpa.sdpa(*args, **kw) for _ in range(2)]
            with monkeypatch.context() as m:
                m.setattr(dispatch, "_hit", None)
                py = autosdpa.sdpa(*args, **kw)
            want = F.scaled_dot_product_attention(*args, **kw)
            for out in hits:
                assert torch.equal(out, py) and out.stride() == py.stride()
                torch.testing.assert_close(out, want)
    assert dispatch._plans, "the calls above were cached"


@needs_native
def test_the_c_hit_path_uses_the_plans_dict_and_forgets_on_clear(monkeypatch):
    """A plan is found through ``_plans`` (here: stand-ins), and clear_plans() drops C's memory of the last one."""
    from autosdpa import _fastkey

    q = torch.randn(1, 1, 4, 4)
    autosdpa.sdpa(q, q, q)
    fk = dispatch._key(q, q, q, None, 0.0, False, False, dispatch._overrides_key)
    assert fk in dispatch._plans
    dispatch._plans[fk] = lambda *a: "first"
    assert autosdpa.sdpa(q, q, q) == "first"
    assert autosdpa.sdpa(q, q, q) == "first"  # now from C's last key
    dispatch.clear_plans()
    dispatch._plans[fk] = lambda *a: "second"
    assert autosdpa.sdpa(q, q, q) == "second"
    # a miss returns the key for Python to decide (other overrides: no plan), or () where there is none to give
    assert _fastkey.hit(q, q, q, None, 0.0, False, None, False, 99) == fastkey.py_key(q, q, q, None, 0.0, False,
                                                                                      False, 99)
    assert _fastkey.hit(q, q, q, None, [0.0], False, None, False, 0) == ()  # an unhashable key
    assert _fastkey.hit(q, q, q, [[1]], 0.0, False, None, False, 0) == ()  # a mask the key cannot read


class _InterruptOnce(torch.Tensor):
    """A mask whose first shape read is interrupted, as a Ctrl-C landing in the key's Python code would be."""
    armed = True

    @property
    def shape(self):
        if _InterruptOnce.armed:
            _InterruptOnce.armed = False
            raise KeyboardInterrupt
        return super().shape


@pytest.mark.parametrize("native", [True, False])
def test_a_keyboard_interrupt_while_keying_is_not_swallowed(native, monkeypatch):
    """An Exception while keying means "let Python handle it"; a KeyboardInterrupt must reach the user."""
    if native and not fastkey.native_available():
        pytest.skip("C fast key unavailable")
    monkeypatch.setenv("AUTOSDPA_NATIVE", "1" if native else "0")
    autosdpa.reset()
    q = torch.randn(1, 1, 4, 4)
    m = torch.zeros(4, 4).as_subclass(_InterruptOnce)
    _InterruptOnce.armed = True
    with pytest.raises(KeyboardInterrupt):
        autosdpa.sdpa(q, q, q, m)
    torch.testing.assert_close(autosdpa.sdpa(q, q, q, m), F.scaled_dot_product_attention(q, q, q, m))


@needs_native
def test_errors_of_the_call_propagate_with_pytorch_s_type():
    """A hit whose call raises (a plan for inputs PyTorch rejects) raises what F.sdpa raises."""
    q, k, v = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 5), torch.randn(1, 2, 8, 4)  # q and k widths differ
    for _ in range(3):
        with pytest.raises(RuntimeError):
            autosdpa.sdpa(q, k, v)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v)


@needs_native
@pytest.mark.skipif(sys.version_info >= (3, 12), reason="None, True and small ints are immortal from 3.12")
def test_the_c_hit_path_leaks_no_references():
    q = torch.randn(1, 1, 4, 4)
    m = torch.ones(4, 4, dtype=torch.bool)
    bias = causal_lower_right(4, 4)
    calls = [((q, q, q), {}), ((q, q, q), {"is_causal": True}), ((q, q, q, m), {}), ((q, q, q), {"attn_mask": bias}),
             ((q, q, q, [[1]]), {})]  # the last: a key C cannot build: () (and F.sdpa's TypeError)
    watched = [q, m, bias, None, True, False, torch.float32, torch.Tensor]

    def run(n):
        for args, kw in calls:
            for _ in range(n):
                try:
                    autosdpa.sdpa(*args, **kw)
                except TypeError:
                    pass
    run(3)
    before = [sys.getrefcount(o) for o in watched]
    run(2000)
    assert [sys.getrefcount(o) for o in watched] == before


@needs_native
def test_threads_clearing_plans_while_others_hit():
    """Hits on four threads while another keeps clearing the plans: no crash, every result F.sdpa's (within
    tolerance: under this contention math can win a problem's tuning)."""
    shapes = [(1, 2, L, 8) for L in (4, 8, 16)]
    inputs = [tuple(torch.randn(s) for _ in range(3)) for s in shapes]
    wants = [F.scaled_dot_product_attention(*x) for x in inputs]
    stop, bad = threading.Event(), []

    def hitter(i):
        n = 0
        while not stop.is_set() and n < 3000:
            j = (i + n) % len(inputs)
            if not torch.allclose(autosdpa.sdpa(*inputs[j]), wants[j], rtol=1e-5, atol=1e-6):
                bad.append(j)
            n += 1

    def clearer():
        while not stop.is_set():
            dispatch.clear_plans()

    threads = [threading.Thread(target=hitter, args=(i,)) for i in range(4)] + [threading.Thread(target=clearer)]
    for t in threads:
        t.start()
    for t in threads[:4]:
        t.join(timeout=120)
    stop.set()
    threads[4].join(timeout=10)
    assert not bad


def test_autosdpa_native_0_runs_the_python_path(monkeypatch):
    monkeypatch.setenv("AUTOSDPA_NATIVE", "0")
    autosdpa.reset()
    assert dispatch._hit is None and dispatch._key is fastkey.py_key
    q = torch.randn(1, 1, 4, 4)
    for _ in range(3):
        assert torch.equal(autosdpa.sdpa(q, q, q), F.scaled_dot_product_attention(q, q, q))
    monkeypatch.setenv("AUTOSDPA_NATIVE", "maybe")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        autosdpa.reset()
    assert any("AUTOSDPA_NATIVE='maybe' is not 0 or 1; using '1'" in str(w.message) for w in caught)
    assert (dispatch._hit is not None) == fastkey.native_available()
