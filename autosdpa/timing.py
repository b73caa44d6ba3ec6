"""Timers: what one call of a candidate costs the user, on its device.

A timer owns the device's clocks, so the tuner's budget, rounds and stopping rule can be driven by fake
clocks in tests. ``Timer`` is the protocol; ``CpuTimer`` and ``CudaTimer`` the real ones.

CPU: ``time.perf_counter`` around enough repetitions of a call to make one sample about ``sample_s`` long.
CUDA: each sample writes 256 MiB first (so no candidate finds its inputs in L2) and times one call with
events: device time. That flush keeps the GPU busy while the host launches the call, so it hides host
launch cost: a Python-launched kernel with tens of microseconds of host work can look faster than PyTorch's
C++ launch of a few microseconds. So when the device time is short, the sample also times calls back to
back without the flush (wall clock over the calls, synchronized at the end), and a sample is the larger of
the two: what a user's eager loop pays per call.
"""
from __future__ import annotations

import contextlib
import random
import statistics
import time
from typing import Callable, Protocol

import torch

_L2_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2
CPU_SAMPLE_S = 2e-4          # one CPU sample: sized for the call, not ~1 ms of repetitions per tiny call
SHORT_GPU_S = 5e-4           # device time below which the host launch may be what the user pays
BACK_TO_BACK_S = 5e-4        # back-to-back calls per short GPU sample: about this long...
MIN_BACK_TO_BACK = 4         # ...and at least this many calls
MAX_REPS = 10_000
FLUSH_S = 2e-4               # about what writing 256 MiB takes on a current GPU (for cost estimates only)


class Timer(Protocol):
    """What the tuner needs of a device's clocks."""

    #: extra calls per candidate before sampling, beyond the checked first call (plans, autotuning)
    warmup_calls: int

    def now(self) -> float:
        """Host wall clock in seconds (the tuning budget is counted on it)."""

    def sync(self) -> None:
        """Wait until the device has finished all queued work."""

    def reps_for(self, call_s: float) -> int:
        """Repetitions per sample for a call that takes about ``call_s`` seconds."""

    def sample(self, fn: Callable[[], object], reps: int) -> float:
        """Seconds per call of ``fn`` as the user pays them, from ``reps`` calls (or as many as the timer uses)."""

    def sample_cost(self, call_s: float, reps: int) -> float:
        """Estimated wall seconds one ``sample(fn, reps)`` takes for a call of about ``call_s`` seconds."""


class CpuTimer:
    warmup_calls = 0

    def __init__(self, clock: Callable[[], float] = time.perf_counter, sample_s: float = CPU_SAMPLE_S):
        self._clock = clock
        self.sample_s = sample_s

    def now(self) -> float:
        return self._clock()

    def sync(self) -> None:
        pass

    def reps_for(self, call_s: float) -> int:
        return max(1, min(MAX_REPS, int(self.sample_s / max(call_s, 1e-7))))

    def sample(self, fn: Callable[[], object], reps: int) -> float:
        clock = self._clock
        t0 = clock()
        for _ in range(reps):
            fn()
        return (clock() - t0) / reps

    def sample_cost(self, call_s: float, reps: int) -> float:
        return call_s * reps


class CudaTimer:
    """Device time with L2 flushed; for short calls at least the host's back-to-back time per call.

    ``clock``, ``synchronize``, ``new_event`` and ``flush`` default to the real ones for ``device``; tests pass
    fakes (``new_event()`` returns objects with ``record()`` and ``elapsed_time(other)`` in milliseconds).
    """

    warmup_calls = 1

    def __init__(self, device: torch.device | None = None, *, clock: Callable[[], float] = time.perf_counter,
                 synchronize: Callable[[], None] | None = None, new_event: Callable[[], object] | None = None,
                 flush: Callable[[], None] | None = None, short_s: float = SHORT_GPU_S,
                 back_to_back_s: float = BACK_TO_BACK_S):
        self.device = device
        self._clock = clock
        self._sync = synchronize or (lambda: torch.cuda.synchronize(device))
        self._event = new_event or (lambda: torch.cuda.Event(enable_timing=True))
        self._flush = flush or self._flush_l2
        self._buffer: torch.Tensor | None = None  # freed with the timer: 256 MiB must not stay in the pool
        self.short_s = short_s
        self.back_to_back_s = back_to_back_s

    def now(self) -> float:
        return self._clock()

    def sync(self) -> None:
        self._sync()

    def reps_for(self, call_s: float) -> int:
        return max(MIN_BACK_TO_BACK, min(MAX_REPS, int(self.back_to_back_s / max(call_s, 1e-7))))

    def sample(self, fn: Callable[[], object], reps: int) -> float:
        ctx = torch.cuda.device(self.device) if self.device is not None else contextlib.nullcontext()
        with ctx:
            self._flush()
            begin, end = self._event(), self._event()
            begin.record()
            fn()
            end.record()
            self._sync()
            device_s = begin.elapsed_time(end) / 1e3
            if device_s >= self.short_s:
                return device_s
            t0 = self._clock()
            for _ in range(reps):
                fn()
            self._sync()
            return max(device_s, (self._clock() - t0) / reps)

    def sample_cost(self, call_s: float, reps: int) -> float:
        return FLUSH_S + call_s * (1 + (reps if call_s < self.short_s else 0))

    def _flush_l2(self) -> None:
        if self._buffer is None:
            self._buffer = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=self.device)
        self._buffer.zero_()


def timer_for(device: torch.device, cpu_sample_s: float = CPU_SAMPLE_S) -> Timer:
    if device.type == "cuda":
        return CudaTimer(device)
    return CpuTimer(sample_s=cpu_sample_s)


def summarize(samples: list[float]) -> tuple[float, float]:
    """(median, interquartile range) of per-call seconds. Quartiles interpolate between the samples
    ("inclusive"), so that one preempted sample among a few does not pass for the spread of all."""
    med = statistics.median(samples)
    if len(samples) < 4:
        return med, max(samples) - min(samples)
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return med, q[2] - q[0]


def round_order(names, r: int) -> list:
    """The order of round ``r``: a new permutation each round, seeded by ``r`` (reproducible). A fixed or rotated
    order gives a contender the same predecessor round after round, which biases its times (CPU sweep: a
    backend alone measured 3-25% slower than F.sdpa running the same kernel; in random order, within noise)."""
    order = list(names)
    random.Random(r).shuffle(order)
    return order


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, *, budget_s: float = 1.0,
                     min_rounds: int = 5, max_rounds: int = 50, timer: Timer | None = None
                     ) -> dict[str, list[float]]:
    """Per-call seconds of each function, one sample each per round (``round_order``), so drift hits all of them
    alike: at least ``min_rounds`` rounds, then more until ``budget_s`` is spent or ``max_rounds`` (for
    benchmarks; the tuner has its own capped, adaptive rounds)."""
    if not fns:
        return {}
    timer = timer or timer_for(device)
    reps = {}
    for name, fn in fns.items():
        for _ in range(1 + timer.warmup_calls):
            fn()
        timer.sync()
        t0 = timer.now()
        fn()
        timer.sync()
        reps[name] = timer.reps_for(timer.now() - t0)
    samples: dict[str, list[float]] = {n: [] for n in fns}
    start = timer.now()
    for r in range(max_rounds):
        for name in round_order(fns, r):
            samples[name].append(timer.sample(fns[name], reps[name]))
        if r + 1 >= min_rounds and timer.now() - start > budget_s:
            break
    return samples
