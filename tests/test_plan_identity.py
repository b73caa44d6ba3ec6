"""A cached plan serves exactly the calls it was decided for: not calls on another device that PyTorch numbers
the same (meta), not tensor subclasses with their own ``__torch_function__``, not numpy arrays, and not calls
made after ``configure()``/``reset()`` cleared the plans while a decision was still running."""
import dataclasses
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import autosdpa
from autosdpa.dispatch import dispatcher


@pytest.fixture(params=["1", "0"], ids=["C", "python"])
def hot_path(request, monkeypatch):
    monkeypatch.setenv("AUTOSDPA_NATIVE", request.param)
    autosdpa.reset()


def _qkv(*shape):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*shape, generator=g) for _ in range(3))


def test_meta_key_value_with_a_cpu_query_get_pytorchs_device_error(hot_path):
    q, k, v = _qkv(1, 2, 8, 4)
    with autosdpa.backend("math"):  # a Plan, run on the hot path
        autosdpa.sdpa(q, k, v)
        autosdpa.sdpa(q, k, v)
        with pytest.raises(RuntimeError) as ours:
            autosdpa.sdpa(q, k.to("meta"), v.to("meta"))
    with pytest.raises(RuntimeError) as theirs:
        F.scaled_dot_product_attention(q, k.to("meta"), v.to("meta"))
    assert type(ours.value) is type(theirs.value)


def test_meta_inputs_do_not_share_a_cpu_plan(hot_path):
    q, k, v = _qkv(1, 2, 8, 4)
    with autosdpa.backend("math"):
        autosdpa.sdpa(q, k, v)
        out = autosdpa.sdpa(q.to("meta"), k.to("meta"), v.to("meta"))
    assert out.device.type == "meta" and out.shape == (1, 2, 8, 4)


class Traced(torch.Tensor):
    """A subclass with its own __torch_function__: F.sdpa's override must run for it."""
    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            cls.seen.append(func.__name__)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_torch_function_subclasses_reach_their_override_on_a_hit(hot_path):
    q, k, v = _qkv(1, 2, 8, 4)
    with autosdpa.backend("math"):
        autosdpa.sdpa(q, k, v)
        autosdpa.sdpa(q, k, v)  # cached: a Plan that runs PyTorch's math op directly
        Traced.seen.clear()
        out = autosdpa.sdpa(q.as_subclass(Traced), k.as_subclass(Traced), v.as_subclass(Traced))
    assert Traced.seen == ["scaled_dot_product_attention"]
    torch.testing.assert_close(out.as_subclass(torch.Tensor), F.scaled_dot_product_attention(q, k, v))


def test_numpy_key_value_raise_pytorchs_type_error(hot_path):
    q, k, v = _qkv(1, 2, 8, 4)
    with autosdpa.backend("math"):
        autosdpa.sdpa(q, k, v)
        autosdpa.sdpa(q, k, v)
        with pytest.raises(TypeError):
            autosdpa.sdpa(q, k.numpy(), v.numpy())
    with pytest.raises(TypeError):
        F.scaled_dot_product_attention(q, k.numpy(), v.numpy())
    with pytest.raises(TypeError):
        autosdpa.sdpa(q, np.asarray(k), np.asarray(v))


def test_a_decision_running_while_configure_clears_the_plans_is_not_cached(monkeypatch):
    """configure()/reset() in one thread while another thread has just decided: the old decision must not be
    cached after the clear (it was made under the old settings)."""
    from autosdpa import dispatch

    decided, configured = threading.Event(), threading.Event()
    real_plan_for = dispatch.plan_for

    def plan_for_then_wait(*a, **kw):  # the decision is made; the plan is not cached yet
        decided.set()
        assert configured.wait(10)
        return real_plan_for(*a, **kw)
    monkeypatch.setattr(dispatch, "plan_for", plan_for_then_wait)
    q, k, v = _qkv(1, 2, 8, 4)
    worker = threading.Thread(target=lambda: autosdpa.sdpa(q, k, v))
    with autosdpa.backend("math"):  # process-wide, like PyTorch's flags: the worker decides a forced Plan
        worker.start()
        assert decided.wait(10)
    dispatcher.configure(dataclasses.replace(dispatcher.settings, mode="off"))
    configured.set()
    worker.join(10)
    assert not worker.is_alive()
    assert dispatcher.cached_plans() == []
    monkeypatch.setattr(dispatch, "plan_for", real_plan_for)
    with autosdpa.backend("math"):  # the same fast key the worker had: mode "off" now, plain F.sdpa
        torch.testing.assert_close(autosdpa.sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert dispatcher.cached_plans() == [None]
