"""Timers on fake clocks: CPU samples sized for the call, and on a (fake) GPU the larger of host and device
time for short calls, so a kernel with a slow host launch cannot win a decode step on device time alone."""
import pytest
import torch

from autosdpa.backends import Call
from autosdpa.timing import CpuTimer, CudaTimer, summarize, time_interleaved
from autosdpa.tuner import TuneConfig, choose, measure
from tuner_fakes import FakeBackend, FakeClock, FakeGpu


def test_cpu_sample_is_seconds_per_call():
    clock = FakeClock()
    t = CpuTimer(clock=clock, sample_s=200e-6)
    calls = []

    def fn():
        calls.append(1)
        clock.advance(10e-6)
    assert t.sample(fn, 7) == pytest.approx(10e-6)
    assert len(calls) == 7


@pytest.mark.parametrize("call_s, reps", [(1e-6, 200), (10e-6, 20), (150e-6, 1), (2.0, 1), (0.0, 2000)])
def test_cpu_reps_sized_for_the_call(call_s, reps):
    # ~200 us of repetitions per sample, not ~1 ms: a tiny decode call costs little per sample.
    assert CpuTimer(sample_s=200e-6).reps_for(call_s) == reps


def test_gpu_long_call_is_device_time_with_flush_and_no_back_to_back():
    gpu = FakeGpu()
    t = CudaTimer(**gpu.timer_kwargs(), short_s=500e-6)
    launches = []

    def fn():
        launches.append(1)
        gpu.launch(30e-6, 2e-3)
    assert t.sample(fn, 10) == pytest.approx(2e-3)
    assert gpu.flushes == 1 and len(launches) == 1  # long: one flushed call, nothing back to back


def test_gpu_short_call_pays_its_host_launch():
    gpu = FakeGpu()
    t = CudaTimer(**gpu.timer_kwargs(), short_s=500e-6)
    # The flush keeps the device busy while the host launches, so events see only the 5 us kernel...
    slow_host = lambda: gpu.launch(40e-6, 5e-6)  # noqa: E731
    # ...but back to back the host's 40 us per call is what a user's loop pays.
    assert t.sample(slow_host, 20) == pytest.approx(40e-6, rel=0.05)
    fast_host = lambda: gpu.launch(4e-6, 8e-6)  # noqa: E731
    assert t.sample(fast_host, 20) == pytest.approx(8e-6, rel=0.1)


def test_gpu_flush_only_timing_hides_the_host():
    # What the rule fixes: without back-to-back timing (short_s=0) the slow-host kernel looks faster.
    gpu = FakeGpu()
    t = CudaTimer(**gpu.timer_kwargs(), short_s=0.0)
    assert t.sample(lambda: gpu.launch(40e-6, 5e-6), 20) == pytest.approx(5e-6)


def _decode_call():
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 4, 64, 16)
    return Call(q, k, k)


@pytest.mark.parametrize("short_s, winner", [(500e-6, "cpp_launch"), (0.0, "python_launch")])
def test_measure_ranks_short_gpu_calls_by_what_the_user_pays(short_s, winner):
    """A Python-launched kernel (40 us host, 5 us device) against a C++-launched one (4 us host, 8 us
    device): with the host counted it must lose. short_s=0 turns the rule off, and then it wins: this
    test fails if measure() ranks by flushed device time alone."""
    gpu = FakeGpu()
    py = FakeBackend("python_launch", gpu=gpu, host_s=40e-6, device_s=5e-6)
    cpp = FakeBackend("cpp_launch", gpu=gpu, host_s=4e-6, device_s=8e-6)
    timer = CudaTimer(**gpu.timer_kwargs(), short_s=short_s)
    rows = measure(_decode_call(), [py, cpp], TuneConfig(budget_s=0.05), timer=timer, pytorch_choice=None)
    meas = {m.backend: m for m in rows}
    assert all(m.ok for m in rows), rows
    assert choose(meas, ["python_launch", "cpp_launch"], None)[0] == winner
    if short_s:
        assert meas["python_launch"].median_s == pytest.approx(40e-6, rel=0.1)


def test_time_interleaved_runs_min_rounds_on_any_timer():
    clock = FakeClock()
    fns = {"a": lambda: clock.advance(1e-3), "b": lambda: clock.advance(2e-3)}
    out = time_interleaved(fns, torch.device("cpu"), budget_s=0.0, min_rounds=4, max_rounds=9,
                           timer=CpuTimer(clock=clock))
    assert [len(out["a"]), len(out["b"])] == [4, 4]
    assert summarize(out["b"])[0] == pytest.approx(2e-3)


def test_summarize_median_and_spread():
    assert summarize([3.0, 1.0, 2.0]) == (2.0, 2.0)
    med, iqr = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert med == 3.0 and iqr == 2.0  # one outlier of five does not set the spread


@pytest.mark.parametrize("budget, compiled_status", [(5.0, "ok"), (1.0, "skipped")])
def test_gpu_first_call_compile_is_not_its_time(budget, compiled_status):
    """A kernel compiling for 3 s on its first call: with time left, the warm-up call and the samples give its
    real cost (the compile never becomes its median); when the compile alone is over the whole budget it is
    skipped as too slow (a later process finds it compiled), never stored as a 3 s kernel."""
    gpu = FakeGpu()
    jit = FakeBackend("jit", gpu=gpu, host_s=4e-6, device_s=6e-6, first_cost=3.0)
    eager = FakeBackend("eager", gpu=gpu, host_s=4e-6, device_s=8e-6)
    rows = measure(_decode_call(), [jit, eager], TuneConfig(budget_s=budget), timer=CudaTimer(**gpu.timer_kwargs()),
                   pytorch_choice="eager")
    meas = {m.backend: m for m in rows}
    assert meas["jit"].status == compiled_status
    if compiled_status == "ok":
        assert meas["jit"].median_s == pytest.approx(6e-6, rel=0.2) and meas["jit"].samples >= 3
        assert choose(meas, ["jit", "eager"], "eager")[0] == "jit"
    else:
        assert meas["jit"].detail.startswith("too slow") and meas["eager"].ok


def test_rounds_change_the_order_so_no_contender_keeps_one_predecessor():
    from autosdpa.timing import round_order
    names = ["default", "autosdpa", "flash", "math"]
    orders = [round_order(names, r) for r in range(40)]
    assert all(sorted(o) == sorted(names) for o in orders)
    assert orders == [round_order(names, r) for r in range(40)]  # seeded: a rerun samples in the same order
    for n in names:
        before = {o[o.index(n) - 1] for o in orders if o.index(n) > 0}
        assert len(before) == 3, (n, before)  # every other contender ran just before it in some round
        assert sum(o[0] == n for o in orders) >= 4
