"""Timing candidates side by side: interleaved rounds, medians, within a time budget.

CUDA: events, warm-up first (cuDNN builds its plan on the first call), L2 flushed before every sample.
CPU: ``time.perf_counter`` around enough repetitions to make one sample ~1 ms.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

_L2_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2


def summarize(samples: list[float]) -> tuple[float, float]:
    """(median, interquartile range) of per-call seconds."""
    med = statistics.median(samples)
    if len(samples) < 4:
        return med, max(samples) - min(samples)
    q = statistics.quantiles(samples, n=4)
    return med, q[2] - q[0]


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, *, budget_s: float = 1.0,
                     min_rounds: int = 5, max_rounds: int = 50) -> dict[str, list[float]]:
    """Per-call seconds of each function, sampled round-robin so drift hits all of them alike."""
    if not fns:
        return {}
    if device.type == "cuda":
        return _time_cuda(fns, device, budget_s, min_rounds, max_rounds)
    return _time_cpu(fns, budget_s, min_rounds, max_rounds)


def _time_cpu(fns, budget_s, min_rounds, max_rounds):
    reps = {}
    for name, fn in fns.items():
        fn()  # warm-up
        t0 = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t0, 1e-7)
        reps[name] = max(1, min(10_000, int(1e-3 / one)))
    samples: dict[str, list[float]] = {n: [] for n in fns}
    start = time.perf_counter()
    for r in range(max_rounds):
        for name, fn in fns.items():
            n = reps[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
        if r + 1 >= min_rounds and time.perf_counter() - start > budget_s:
            break
    return samples


def _time_cuda(fns, device, budget_s, min_rounds, max_rounds):
    with torch.cuda.device(device):
        # Written before every sample so that no candidate finds its inputs in L2. Allocated per tuning run
        # and freed after it: 256 MiB should not stay in the user's memory pool.
        flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
        for fn in fns.values():  # warm-up: plans, autotuning, lazy init
            fn()
            fn()
        torch.cuda.synchronize()
        samples: dict[str, list[float]] = {n: [] for n in fns}
        start = time.perf_counter()
        for r in range(max_rounds):
            events = []
            for name, fn in fns.items():
                flush.zero_()
                b, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                b.record()
                fn()
                e.record()
                events.append((name, b, e))
            torch.cuda.synchronize()
            for name, b, e in events:
                samples[name].append(b.elapsed_time(e) / 1e3)
            if r + 1 >= min_rounds and time.perf_counter() - start > budget_s:
                break
    return samples
