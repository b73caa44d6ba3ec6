"""Fake clocks, a fake GPU stream and scripted backends, so that the tuner's budget, rounds, stopping and
ranking rules are tested deterministically on CPU (no timing assertions: the clocks are fake)."""
from __future__ import annotations

import torch.nn.functional as F

from autosdpa.backends import Backend


class FakeClock:
    """Seconds that pass only when a fake backend says so."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


class FakeBackend(Backend):
    """A backend with a scripted cost and answer.

    ``cost``: fake seconds per call (a number, or a function of the call number, 1-based); ``first_cost`` for
    the first call only (on a fake GPU: its host time, e.g. a compile); ``fn(q, k, v, mask, dropout, causal, scale, gqa)`` computes the output (default:
    F.sdpa, the right answer); ``launch(host_s, device_s)`` replaces the clock for fake-GPU backends.
    """

    def __init__(self, name, clock=None, cost=0.0, *, first_cost=None, fn=None, gpu=None, host_s=0.0,
                 device_s=0.0):
        self.name = name
        self.clock, self.cost, self.first_cost, self.fn = clock, cost, first_cost, fn
        self.gpu, self.host_s, self.device_s = gpu, host_s, device_s
        self.calls = 0

    def not_supported_reasons(self, call):
        return []

    def run(self, q, k, v, m=None, dp=0.0, ic=False, sc=None, gqa=False):
        self.calls += 1
        if self.gpu is not None:
            first = self.calls == 1 and self.first_cost is not None
            self.gpu.launch(self.first_cost if first else self.host_s, self.device_s)
        elif self.clock is not None:
            if self.calls == 1 and self.first_cost is not None:
                self.clock.advance(self.first_cost)
            else:
                self.clock.advance(self.cost(self.calls) if callable(self.cost) else self.cost)
        if self.fn is not None:
            return self.fn(q, k, v, m, dp, ic, sc, gqa)
        return F.scaled_dot_product_attention(q, k, v, m, dp, ic, scale=sc, enable_gqa=gqa)


class FakeGpu:
    """One CUDA stream on a fake clock: the host runs ahead, queuing work; the device runs it in order.

    ``launch(host_s, device_s)``: the host spends ``host_s`` launching; the kernel starts when both it is
    launched and the device is free. Events are stamped when the device reaches them.
    """

    def __init__(self, flush_s: float = 100e-6):
        self.host = 0.0
        self.device_free = 0.0
        self.flush_s = flush_s
        self.flushes = 0

    def clock(self) -> float:
        return self.host

    def launch(self, host_s: float, device_s: float) -> None:
        self.host += host_s
        self.device_free = max(self.device_free, self.host) + device_s

    def synchronize(self) -> None:
        self.host = max(self.host, self.device_free)

    def flush(self) -> None:  # the 256 MiB memset: cheap to launch, long on the device
        self.flushes += 1
        self.launch(2e-6, self.flush_s)

    def event(self) -> "FakeEvent":
        return FakeEvent(self)

    def timer_kwargs(self) -> dict:
        return dict(clock=self.clock, synchronize=self.synchronize, new_event=self.event, flush=self.flush)


class FakeEvent:
    def __init__(self, gpu: FakeGpu):
        self.gpu, self.t = gpu, None

    def record(self) -> None:
        g = self.gpu
        self.t = g.device_free = max(g.device_free, g.host)

    def elapsed_time(self, other: "FakeEvent") -> float:
        return (other.t - self.t) * 1e3  # milliseconds, as torch.cuda.Event
