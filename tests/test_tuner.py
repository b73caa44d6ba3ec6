"""measure() on fake clocks: the budget is a hard cap, the rounds stop once the ranking is settled, clearly
slower candidates stop early, one reference serves every candidate (a part of it for large calls), and the
layout ``finish`` is both timed and checked."""
import math

import pytest
import torch
import torch.nn.functional as F

import autosdpa.checks as checks
from autosdpa.forms import dense
from autosdpa.backends import Call
from autosdpa.checks import Check, InvalidInputs, choose_part
from autosdpa.timing import CpuTimer
from autosdpa.tuner import TuneConfig, choose, measure
from tuner_fakes import FakeBackend, FakeClock

MS = 1e-3


def _call(*shape, **kw):
    q = torch.randn(*shape)
    return Call(q, torch.randn(*shape), torch.randn(*shape), **kw)


def _run(backends, clock, budget=1.0, call=None, prefer=None, **cfg):
    call = call or _call(1, 2, 8, 16)
    rows = measure(call, backends, TuneConfig(budget_s=budget, **cfg), timer=CpuTimer(clock=clock),
                   pytorch_choice=prefer)
    return {m.backend: m for m in rows}


def test_settled_ranking_stops_long_before_the_budget():
    clock = FakeClock()
    a, b = FakeBackend("a", clock, 1 * MS), FakeBackend("b", clock, 1.5 * MS)
    meas = _run([a, b], clock, budget=1.0, max_rounds=50)
    assert meas["a"].ok and meas["b"].ok
    assert meas["a"].median_s == pytest.approx(1 * MS) and meas["b"].median_s == pytest.approx(1.5 * MS)
    assert meas["a"].samples == meas["b"].samples == TuneConfig().stable_rounds  # settled, not 50 rounds
    assert clock.t < 0.05  # of a 1 s budget
    assert choose(meas, ["a", "b"], None)[0] == "a"


def test_near_tie_settles_to_pytorchs_pick():
    clock = FakeClock()
    a, b = FakeBackend("a", clock, 1.00 * MS), FakeBackend("b", clock, 1.01 * MS)
    meas = _run([a, b], clock, prefer="b", max_rounds=50)
    assert meas["a"].samples <= 4 and meas["b"].samples <= 4
    assert choose(meas, ["a", "b"], "b")[0] == "b"


def test_clearly_dominated_candidate_stops_after_a_cheap_look_but_keeps_its_row():
    clock = FakeClock()
    fast, slow = FakeBackend("fast", clock, 1 * MS), FakeBackend("slow", clock, 5 * MS)
    meas = _run([fast, slow], clock, max_rounds=50)
    assert meas["slow"].ok and meas["slow"].samples == 1
    assert "slower than fast" in meas["slow"].detail
    assert meas["fast"].samples >= TuneConfig().min_rounds
    assert slow.calls == 2  # its checked first call and one sample


def _flip_flop(clock, name, phase):
    # Two candidates whose lead swaps every round: never settled, so only the budget stops the rounds.
    return FakeBackend(name, clock, lambda i: (1.0 if (i + phase) % 2 else 1.4) * MS)


def test_budget_is_a_hard_cap_on_all_of_measure():
    clock = FakeClock()
    a, b = _flip_flop(clock, "a", 0), _flip_flop(clock, "b", 1)
    budget = 0.1
    meas = _run([a, b], clock, budget=budget, max_rounds=2000)  # 2000 rounds would take 2.4 s
    assert meas["a"].ok and meas["b"].ok
    # Overshoot bound: at most one call (here: one sample) per candidate past the cap.
    assert budget * 0.9 < clock.t <= budget + 2 * 1.4 * MS


def test_call_bigger_than_the_budget_gets_one_to_three_samples():
    # Calls over the whole budget: their checked first call is their one sample; after the deadline no
    # other call starts, so the overshoot is the call running at the deadline.
    clock = FakeClock()
    a, b = FakeBackend("a", clock, 0.6), FakeBackend("b", clock, 0.7)
    meas = _run([a, b], clock, budget=0.5)
    assert all(m.ok and m.samples == 1 and "one sample" in m.detail for m in meas.values())
    assert a.calls == b.calls == 1 and clock.t == pytest.approx(1.3)
    # Calls near the budget: past the deadline each candidate starts at most one more call (here a sample:
    # a ranking never rests on first calls alone when a real sample is affordable).
    for budget, cost_a, cost_b in ((0.5, 0.3, 0.35), (1.0, 0.2, 0.25)):
        clock = FakeClock()
        a, b = FakeBackend("a", clock, cost_a), FakeBackend("b", clock, cost_b)
        meas = _run([a, b], clock, budget=budget)
        assert all(m.ok and 1 <= m.samples <= 3 for m in meas.values())
        running_at_deadline = max(cost_a, cost_b)
        assert clock.t <= budget + running_at_deadline + cost_a + cost_b


def test_first_call_longer_than_the_budget_is_skipped_as_too_slow():
    clock = FakeClock()
    hang = FakeBackend("hang", clock, 1 * MS, first_cost=5.0)
    good = FakeBackend("good", clock, 1 * MS)
    meas = _run([hang, good], clock, budget=1.0)
    assert meas["hang"].status == "skipped" and meas["hang"].detail.startswith("too slow")
    assert hang.calls == 1
    # Its 5 s spent the budget: the others keep their checked first call as their one sample.
    assert meas["good"].ok and meas["good"].samples == 1 and good.calls == 1
    assert clock.t == pytest.approx(5.0 + 1 * MS)


def test_everyone_slow_is_not_too_slow():
    clock = FakeClock()
    a, b = FakeBackend("a", clock, 0.6), FakeBackend("b", clock, 0.7)
    meas = _run([a, b], clock, budget=0.5)
    assert meas["a"].ok and meas["b"].ok


def test_one_reference_serves_every_candidate(monkeypatch):
    seen = []
    real = dense.reference
    monkeypatch.setattr(dense, "reference", lambda *a, **k: seen.append(1) or real(*a, **k))
    clock = FakeClock()
    _run([FakeBackend(n, clock, MS) for n in "abcd"], clock)
    assert len(seen) == 1


def test_keyboard_interrupt_from_a_backend_propagates_at_once():
    clock = FakeClock()

    def interrupt(*a):
        raise KeyboardInterrupt
    before, ctrl_c, after = (FakeBackend("before", clock, MS), FakeBackend("ctrl_c", clock, MS, fn=interrupt),
                             FakeBackend("after", clock, MS))
    with pytest.raises(KeyboardInterrupt):
        _run([before, ctrl_c, after], clock)
    assert after.calls == 0  # nothing ran after the interrupt


def test_keyboard_interrupt_from_the_timer_propagates():
    clock = FakeClock()

    class InterruptedTimer(CpuTimer):
        def sample(self, fn, reps):
            raise KeyboardInterrupt
    a, b = FakeBackend("a", clock, MS), FakeBackend("b", clock, MS)
    with pytest.raises(KeyboardInterrupt):
        measure(_call(1, 2, 8, 16), [a, b], TuneConfig(), timer=InterruptedTimer(clock=clock))
    assert a.calls == b.calls == 1


def test_failure_mid_timing_rejects_only_that_candidate():
    clock = FakeClock()

    def flaky_fn(q, k, v, *a):
        if flaky.calls > 3:
            raise RuntimeError("illegal memory access")
        return F.scaled_dot_product_attention(q, k, v)
    flaky = FakeBackend("flaky", clock, MS, fn=flaky_fn)
    good = FakeBackend("good", clock, 2 * MS)
    meas = _run([flaky, good], clock, max_rounds=50)
    assert meas["flaky"].status == "rejected" and "illegal memory access" in meas["flaky"].detail
    assert meas["flaky"].detail.startswith("failed while timing")
    assert meas["good"].ok


def test_finish_is_timed_and_checked():
    clock = FakeClock()
    finished = []

    def blhd(q, k, v, *a):  # a backend whose output comes in another memory layout
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).contiguous().transpose(1, 2)

    def finish(out, name):
        finished.append(name)
        clock.advance(0.5 * MS if name == "blhd" else 0.0)  # the copy costs the user time
        return out.contiguous()
    a = FakeBackend("blhd", clock, 1 * MS, fn=blhd)
    b = FakeBackend("bhld", clock, 1.2 * MS)
    rows = measure(_call(1, 2, 8, 16), [a, b], TuneConfig(), finish=finish, timer=CpuTimer(clock=clock),
                   pytorch_choice=None)
    meas = {m.backend: m for m in rows}
    assert meas["blhd"].median_s == pytest.approx(1.5 * MS)  # the copy is in its time...
    assert choose(meas, ["blhd", "bhld"], None)[0] == "bhld"  # ...and decides
    assert finished.count("blhd") == a.calls and finished.count("bhld") == b.calls


def test_finish_output_is_what_is_checked():
    clock = FakeClock()
    bad_finish = lambda out, name: out * 2 if name == "a" else out  # noqa: E731
    rows = measure(_call(1, 2, 8, 16), [FakeBackend("a", clock, MS), FakeBackend("b", clock, MS)], TuneConfig(),
                   finish=bad_finish, timer=CpuTimer(clock=clock), pytorch_choice=None)
    meas = {m.backend: m for m in rows}
    assert meas["a"].status == "rejected" and meas["a"].detail.startswith("wrong result")
    assert meas["b"].ok


def test_training_checks_gradients():
    clock = FakeClock()

    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

        @staticmethod
        def backward(ctx, g):
            return torch.zeros_like(g), torch.zeros_like(g), torch.zeros_like(g)
    wrong = FakeBackend("wrong_grad", clock, MS, fn=lambda q, k, v, *a: WrongGrad.apply(q, k, v))
    good = FakeBackend("good", clock, 2 * MS)
    call = _call(1, 2, 8, 16, needs_grad=True)
    meas = _run([wrong, good], clock, call=call)
    assert meas["wrong_grad"].status == "rejected" and "wrong result" in meas["wrong_grad"].detail
    assert meas["good"].ok and meas["good"].max_error is not None


def test_empty_inputs_give_skipped_rows():
    clock = FakeClock()
    q = torch.randn(1, 2, 0, 16)
    a = FakeBackend("a", clock, MS)
    rows = measure(Call(q, q, q), [a], TuneConfig(), timer=CpuTimer(clock=clock))
    assert [(m.backend, m.status) for m in rows] == [("a", "skipped")] and "empty" in rows[0].detail
    assert a.calls == 0


def test_scale_zero_does_not_crash():
    clock = FakeClock()
    meas = _run([FakeBackend("a", clock, MS), FakeBackend("b", clock, 2 * MS)], clock,
                call=_call(1, 2, 8, 16, scale=0.0))
    assert meas["a"].ok and meas["b"].ok


def test_inputs_the_reference_rejects_raise_invalid_inputs():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(InvalidInputs):
        measure(Call(q, k, v), [FakeBackend("a")], TuneConfig(), timer=CpuTimer(clock=FakeClock()))


# -- the reduced check ---------------------------------------------------------------------------------------

def test_small_calls_are_checked_whole_and_large_ones_in_part():
    assert choose_part(_call(1, 8, 1, 64)) is None  # a decode step
    p = choose_part(_call(64, 12, 197, 64))  # ViT-B/16: 4 of 768 slices, about 1/64 of the call's work
    assert p is not None and [(b.b, b.h) for b in p.blocks] == [(0, 0), (0, 11), (63, 0), (63, 11)]
    assert p.rows is None
    p = choose_part(_call(1, 1, 4096, 64))  # one long slice: its first and last rows
    assert [(b.b, b.h) for b in p.blocks] == [(0, 0)] and p.rows == ((0, 8), (4088, 4096))
    assert choose_part(_call(1, 1, 4096, 64, needs_grad=True)).rows is None  # gradients need every row


def test_gqa_part_keeps_every_query_head_of_a_kv_head():
    q, kv = torch.randn(3, 8, 16, 8), torch.randn(3, 2, 16, 8)
    p = choose_part(Call(q, kv, kv, enable_gqa=True), max_work=1)
    assert [(b.b, b.h, b.group) for b in p.blocks] == [(2, 1, 4)]
    assert torch.equal(p.blocks[0].q(q), q[2:3, 4:8]) and torch.equal(p.blocks[0].kv(kv), kv[2:3, 1:2])


def _corrupt_at(b, h, row=None, value=1.0):
    def fn(q, k, v, m, dp, ic, sc, gqa):
        out = F.scaled_dot_product_attention(q, k, v, m, dp, ic, scale=sc, enable_gqa=gqa).clone()
        if row is None:
            out[b, h] += value
        else:
            out[b, h, row] += value
        return out
    return fn


@pytest.mark.parametrize("mask", [None, "bool", "float2d"])
def test_part_check_passes_right_and_rejects_wrong_backends(monkeypatch, mask):
    monkeypatch.setattr(checks, "CHECK_WORK", 1)  # force the smallest part on a small call
    q, k, v = torch.randn(4, 3, 32, 8), torch.randn(4, 3, 32, 8), torch.randn(4, 3, 32, 8)
    m = {None: None, "bool": torch.rand(4, 1, 32, 32) > 0.2, "float2d": torch.randn(32, 32)}[mask]
    call = Call(q, k, v, m)
    check = Check(call, None)
    assert check.part is not None and check.part.rows is not None
    run = lambda fn: fn(q, k, v, m, 0.0, False, None, False)  # noqa: E731
    assert check.judge(run(_corrupt_at(0, 0, value=0.0)), ())[1] is None
    err, reason = check.judge(run(_corrupt_at(3, 2, row=31)), ())  # last block, last row: inside the part
    assert reason.startswith("wrong result") and "checked on" in reason
    nan = check.judge(run(_corrupt_at(1, 1, row=16, value=math.nan)), ())[1]  # outside the part
    assert nan is not None and "non-finite" in nan


def test_part_check_of_gradients(monkeypatch):
    monkeypatch.setattr(checks, "CHECK_WORK", 1)
    clock = FakeClock()

    class WrongKeyGrad(torch.autograd.Function):  # dk wrong in the last kv head only
        @staticmethod
        def forward(ctx, q, k, v):
            with torch.enable_grad():
                qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
                out = F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True)
            ctx.save_for_backward(qq, kk, vv, out)
            return out.detach()

        @staticmethod
        def backward(ctx, g):
            qq, kk, vv, out = ctx.saved_tensors
            dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), g)
            dk = dk.clone()
            dk[:, -1] += 1.0
            return dq, dk, dv
    q, kv = torch.randn(2, 4, 16, 8), torch.randn(2, 2, 16, 8)
    call = Call(q, kv, kv.clone(), enable_gqa=True, needs_grad=True)
    wrong = FakeBackend("wrong_dk", clock, MS, fn=lambda q, k, v, *a: WrongKeyGrad.apply(q, k, v))
    good = FakeBackend("good", clock, 2 * MS)
    meas = _run([wrong, good], clock, call=call)
    assert meas["wrong_dk"].status == "rejected" and "checked on" in meas["wrong_dk"].detail
    assert meas["good"].ok


def test_reference_out_of_memory_times_unchecked_and_says_so(monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(dense, "reference", oom)
    clock = FakeClock()
    meas = _run([FakeBackend("a", clock, MS), FakeBackend("nan", clock, MS, fn=lambda q, *a: q * math.nan)], clock)
    assert meas["a"].ok and meas["a"].max_error is None and "not compared" in meas["a"].detail
    assert meas["nan"].status == "rejected"  # finite inputs still need finite outputs


def test_dropout_outputs_are_not_compared_but_must_be_finite():
    clock = FakeClock()
    meas = _run([FakeBackend("a", clock, MS), FakeBackend("nan", clock, MS, fn=lambda q, *a: q * math.nan)], clock,
                call=_call(1, 2, 8, 16, dropout_p=0.5))
    assert meas["a"].ok and meas["a"].detail == "dropout: output not compared"
    assert meas["nan"].status == "rejected" and "non-finite" in meas["nan"].detail


def test_each_candidate_is_timed_as_a_plan_runs_it_through_its_runner():
    """A backend whose runner is cheaper than its checked path is ranked by the runner: that is what runs."""
    clock = FakeClock()

    class SetUpOnce(FakeBackend):
        def runner(self, call):
            self.set_up = getattr(self, "set_up", 0) + 1
            cheap = FakeBackend(self.name + "-runner", clock, 0.5 * MS)
            return cheap.run

    fast_when_set_up = SetUpOnce("set_up_once", clock, 2 * MS)
    plain = FakeBackend("plain", clock, 1 * MS)
    meas = _run([fast_when_set_up, plain], clock)
    assert fast_when_set_up.set_up == 1 and fast_when_set_up.calls == 0  # never the checked path
    assert meas["set_up_once"].median_s == pytest.approx(0.5 * MS)
    assert choose(meas, ["set_up_once", "plain"], None)[0] == "set_up_once"
