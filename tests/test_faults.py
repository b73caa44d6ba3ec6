"""Fault injection: registered fake backends that raise, return NaN or wrong values, run out of memory, take
longer than the whole budget on their first call, or are interrupted. Each is rejected (or skipped, for too
slow) with its reason, its memory is released, the tuning still picks the right winner, and nothing else is
left changed. Ctrl-C is never swallowed."""
import gc
import time
import weakref

import pytest
import torch
import torch.nn.functional as F

import autosdpa
from autosdpa.backends import all_backends, register, unregister
from autosdpa.backends.torch_backends import torch_flags
from autosdpa.timing import CpuTimer
from autosdpa.tuner import TuneConfig, choose, measure
from autosdpa.backends import Call
from autosdpa.problem import Problem
from tuner_fakes import FakeBackend, FakeClock

MS = 1e-3


def _raise(*a):
    raise RuntimeError("kernel exploded\nsecond line of the message")


def _nan(q, k, v, *a):
    return torch.full((*q.shape[:-1], v.shape[-1]), float("nan"), dtype=q.dtype)


def _wrong(q, k, v, *a):
    return F.scaled_dot_product_attention(q, k, v) + 0.5


class _Oom:
    """Allocates a big temporary, then runs out of memory; ``freed()`` says whether the temporary is gone."""

    def __init__(self, nbytes=64 << 20):
        self.nbytes, self.ref = nbytes, None

    def __call__(self, q, *a):
        big = torch.empty(self.nbytes // 4, dtype=torch.float32, device=q.device)
        self.ref = weakref.ref(big)
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {self.nbytes >> 20} MiB")

    def freed(self) -> bool:
        return self.ref is not None and self.ref() is None


def _sleepy(q, k, v, *a):
    time.sleep(0.25)  # > the tests' 0.02 s budget, > the 0.1 s floor, > 2x any real backend's call
    return F.scaled_dot_product_attention(q, k, v)


def _interrupt(*a):
    raise KeyboardInterrupt


@pytest.fixture
def registered():
    """register() fakes for one test; unregistered after, leaving the registry as it was."""
    before = [b.name for b in all_backends()]
    made = []

    def add(backend):
        made.append(register(backend))
        return backend
    yield add
    for b in made:
        unregister(b.name)
    assert [b.name for b in all_backends()] == before


def test_every_fault_is_rejected_with_its_reason_and_the_right_backend_wins(registered):
    clock = FakeClock()
    oom = _Oom()
    fakes = [registered(FakeBackend(n, clock, c, fn=fn, first_cost=first)) for n, c, fn, first in [
        ("raises", 0.1 * MS, _raise, None), ("nan", 0.1 * MS, _nan, None), ("wrong", 0.1 * MS, _wrong, None),
        ("oom", 0.1 * MS, oom, None), ("too_slow", 0.1 * MS, None, 5.0),
        ("good", 1 * MS, None, None), ("slower", 3 * MS, None, None)]]
    flags = torch_flags()
    q = torch.randn(2, 2, 16, 8)
    # too_slow's 5 s first call spends the 1 s budget: checks go on (one call each), timing does not.
    rows = measure(Call(q, q, q), fakes, TuneConfig(budget_s=1.0), timer=CpuTimer(clock=clock),
                   pytorch_choice=None)
    m = {r.backend: r for r in rows}
    assert [r.backend for r in rows] == [b.name for b in fakes]
    assert m["raises"].status == "rejected" and m["raises"].detail == "RuntimeError: kernel exploded"
    assert m["nan"].status == "rejected" and m["nan"].detail.startswith("wrong result")
    assert m["wrong"].status == "rejected" and "exceeds tolerance" in m["wrong"].detail
    assert m["oom"].status == "rejected" and m["oom"].detail == "out of memory"
    assert m["too_slow"].status == "skipped" and m["too_slow"].detail.startswith("too slow")
    assert oom.freed()  # without a garbage collection: nothing holds the failed call's frames
    assert choose(m, list(m), None)[0] == "good"
    assert all(b.calls == 1 for b in fakes[:5])  # no fault is retried within the tuning
    assert torch_flags() == flags


def test_failures_do_not_cost_the_others_their_timing(registered):
    clock = FakeClock()
    fakes = [registered(FakeBackend("raises", clock, MS, fn=_raise)), registered(FakeBackend("nan", clock, MS, fn=_nan)),
             registered(FakeBackend("good", clock, 1 * MS)), registered(FakeBackend("slower", clock, 1.5 * MS))]
    m = {r.backend: r for r in measure(Call(*[torch.randn(1, 2, 8, 8)] * 3), fakes, TuneConfig(budget_s=1.0),
                                       timer=CpuTimer(clock=clock), pytorch_choice=None)}
    assert m["good"].samples >= TuneConfig().min_rounds and m["slower"].ok
    assert choose(m, list(m), None)[0] == "good"


def test_keyboard_interrupt_propagates_from_measure(registered):
    clock = FakeClock()
    fakes = [registered(FakeBackend("good", clock, MS)), registered(FakeBackend("ctrl_c", clock, MS, fn=_interrupt)),
             registered(FakeBackend("later", clock, MS))]
    with pytest.raises(KeyboardInterrupt):
        measure(Call(*[torch.randn(1, 2, 8, 8)] * 3), fakes, TuneConfig(), timer=CpuTimer(clock=clock))
    assert fakes[2].calls == 0


# -- end to end, through the dispatcher (real timing: the assertions are about correctness, not speed) -----

def _same_as_pytorch(q):
    torch.testing.assert_close(autosdpa.sdpa(q, q, q), F.scaled_dot_product_attention(q, q, q))


@pytest.mark.parametrize("fault", ["raises", "nan", "wrong", "oom"])
def test_sdpa_rejects_the_fault_and_answers_right(registered, fault):
    oom = _Oom(16 << 20)
    fn = {"raises": _raise, "nan": _nan, "wrong": _wrong, "oom": oom}[fault]
    registered(FakeBackend(fault, fn=fn))
    flags = torch_flags()
    q = torch.randn(2, 2, 16, 8)
    _same_as_pytorch(q)
    d = autosdpa.explain(q, q, q)
    assert d.backend != fault and d.timings[fault] is None
    assert {"raises": "kernel exploded", "nan": "wrong result", "wrong": "wrong result",
            "oom": "out of memory"}[fault] in d.rejected[fault]
    assert torch_flags() == flags
    if fault == "oom":
        assert oom.freed()


def _tune(q, **cfg):
    """First sight through the public offline API, with a TuneConfig (budget, thresholds) of the test's own."""
    key = Problem.from_call(Call(q, q, q)).key
    return autosdpa.tune([key], progress=False, device="cpu", config=TuneConfig(**cfg))[0]


def test_sdpa_skips_a_backend_slower_than_the_budget(registered):
    slow = registered(FakeBackend("hangs", fn=_sleepy))
    q = torch.randn(1, 2, 16, 8)
    d = _tune(q, budget_s=0.02, too_slow_s=0.1)  # _sleepy: 0.25 s a call
    assert d.backend != "hangs" and d.rejected["hangs"].startswith("too slow")
    assert slow.calls == 1
    _same_as_pytorch(q)


def test_sdpa_lets_ctrl_c_through_and_keeps_working(registered):
    registered(FakeBackend("ctrl_c", fn=_interrupt))
    flags = torch_flags()
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(KeyboardInterrupt):
        autosdpa.sdpa(q, q, q)
    unregister("ctrl_c")
    _same_as_pytorch(q)  # the dispatcher's lock and re-entry guard were released
    assert torch_flags() == flags


@pytest.mark.parametrize("fault", ["nan", "wrong", "raises", "oom", "too_slow"])
def test_a_rejection_is_not_retried_by_the_next_process(registered, fault):
    fn = {"raises": _raise, "nan": _nan, "wrong": _wrong, "oom": _Oom(1 << 20), "too_slow": _sleepy}[fault]
    fake = registered(FakeBackend(fault, fn=fn))
    q = torch.randn(1, 2, 16, 8)
    d = _tune(q, budget_s=0.02, too_slow_s=0.1)
    assert fault in d.rejected and fake.calls == 1
    autosdpa.reset()  # a new process on the same database
    _same_as_pytorch(q)
    assert fake.calls == 1


@pytest.mark.gpu
def test_oom_on_cuda_gives_the_memory_back():
    oom = _Oom(1 << 30)
    fakes = [FakeBackend("oom", fn=oom), FakeBackend("good")]
    q = torch.randn(1, 2, 64, 64, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_reserved()
    rows = measure(Call(q, q, q), fakes, TuneConfig(budget_s=0.2), pytorch_choice=None)
    assert rows[0].detail == "out of memory" and rows[1].ok
    gc.collect()
    assert oom.freed() and torch.cuda.memory_reserved() <= before + (64 << 20)
