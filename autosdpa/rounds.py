"""The tuner's timing rounds: each candidate sampled once per round, in a new order each round (so drift and
what ran just before hit all alike), under a hard deadline, stopped as soon as the ranking is settled, with
clearly dominated candidates dropped after a cheap look.

A round starts only if its estimated cost (each candidate's last sample, wall clock) fits before the deadline,
so the rounds overshoot it by at most the error of that estimate. After them, a candidate without a sample
may get one past the deadline (``_last_samples``: the bound is in ``tuner``'s notes).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

from .timing import Timer, round_order, summarize

DOMINANCE_ROUNDS = 2  # after each of the first rounds, up to this many, clearly slower candidates are dropped


class Stopping(Protocol):
    """The fields of TuneConfig the rounds read."""
    budget_s: float
    min_rounds: int
    max_rounds: int
    stable_rounds: int
    dominance: float


@dataclasses.dataclass
class Rounds:
    samples: dict[str, list[float]]   # per-call seconds of every candidate that did not fail
    failed: dict[str, str]            # candidate -> why it failed during warm-up or timing
    notes: dict[str, str]             # candidate -> why its timing stopped before the others'
    est: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per call, warm (no samples: best guess)
    stopped: str = "max_rounds"       # settled | deadline | max_rounds | no candidates


def run_rounds(fns: dict[str, Callable[[], object]], est: dict[str, float], timer: Timer, deadline: float,
               config: Stopping, winner_of: Callable[[dict[str, list[float]]], str | None],
               prefer: str | None, describe: Callable[[Exception], str], late: frozenset[str] = frozenset()
               ) -> Rounds:
    """Sample ``fns`` until settled, ``deadline`` (timer clock) or ``config.max_rounds``; then one sample for
    each candidate still without one, within the overshoot bound (see ``_last_samples``).

    ``est``: seconds per call of each (from its checked first call); ``late``: those whose check started
    after the deadline; ``winner_of`` ranks the samples so far (the tuner's choose()); ``prefer`` is PyTorch's
    pick, which keeps near-ties; ``describe`` turns a candidate's exception into the reason it failed.
    KeyboardInterrupt and other non-Exceptions propagate.
    """
    res = Rounds({n: [] for n in fns}, {}, {})
    first = dict(est)
    res.est = est = dict(est)
    _warm_up(fns, est, timer, deadline, res, describe)
    active = [n for n in fns if n not in res.failed]
    reps = {n: timer.reps_for(est[n]) for n in active}
    cost = {n: timer.sample_cost(est[n], reps[n]) for n in active}  # then the wall time of its last sample
    winners: list[str | None] = []
    for r in range(config.max_rounds):
        if not active:
            res.stopped = "no candidates"
            break
        if timer.now() + sum(cost[n] for n in active) > deadline:
            res.stopped = "deadline"
            break
        for n in round_order(active, r):
            t0 = timer.now()
            try:
                res.samples[n].append(timer.sample(fns[n], reps[n]))
            except Exception as e:  # one candidate failing mid-timing: the rest go on without it
                _fail(res, active, n, f"failed while timing: {describe(e)}")
                continue
            cost[n] = timer.now() - t0
        if r < DOMINANCE_ROUNDS:
            _drop_dominated(res, active, first, config.dominance)
        winners.append(winner_of({n: s for n, s in res.samples.items() if s}))
        if _settled(res.samples, active, winners, config, prefer):
            res.stopped = "settled"
            break
    _last_samples(fns, res, reps, first, late, timer, config, describe)
    return res


def _last_samples(fns, res: Rounds, reps: dict[str, int], first: dict[str, float], late: frozenset[str],
                  timer: Timer, config: Stopping, describe) -> None:
    """Past the deadline, one sample for each candidate still without one (in ``fns`` order: PyTorch's pick
    first), so that no ranking rests on a first call, which carries lazy start-up costs -- unless its check
    already started past the deadline (its one late call), its first call alone was over the budget (that
    call is its sample), or that call was over ``dominance`` x a sampled candidate's median (it loses anyway,
    and a first call only overstates)."""
    for n in fns:
        if n in res.failed or res.samples.get(n):
            continue
        sampled = [summarize(s)[0] for s in res.samples.values() if s]
        if n in late or first[n] > config.budget_s or (sampled and first[n] > config.dominance * min(sampled)):
            continue
        try:
            res.samples[n].append(timer.sample(fns[n], reps[n]))
        except Exception as e:
            _fail(res, None, n, f"failed while timing: {describe(e)}")


def _warm_up(fns, est, timer: Timer, deadline: float, res: Rounds, describe) -> None:
    """The timer's extra warm-up calls (CUDA: plans, autotuning), each started only before the deadline. Not
    gated on the first call's time: that may be a compile, which the warm-up call exists to see past."""
    for _ in range(timer.warmup_calls):
        for n, fn in fns.items():
            if n in res.failed or timer.now() >= deadline:
                continue
            t0 = timer.now()
            try:
                fn()
                timer.sync()
            except Exception as e:
                _fail(res, None, n, f"failed while warming up: {describe(e)}")
                continue
            est[n] = min(est[n], timer.now() - t0)


def _fail(res: Rounds, active: list[str] | None, name: str, detail: str) -> None:
    res.failed[name] = detail[:500]
    res.samples.pop(name, None)
    if active is not None:
        active.remove(name)


def _drop_dominated(res: Rounds, active: list[str], first: dict[str, float], dominance: float) -> None:
    """Stop timing candidates whose every observation (checked first call and samples) is over ``dominance`` x
    the leader's median: they keep their samples (evidence for the store) but cost no more rounds."""
    obs = {n: res.samples[n] + [first[n]] for n in active if res.samples[n]}
    if len(obs) < 2:
        return
    best = min(obs, key=lambda n: summarize(obs[n])[0])
    best_med = summarize(obs[best])[0]
    for n, o in obs.items():
        if n != best and min(o) > dominance * best_med:
            active.remove(n)
            res.notes[n] = (f"timing stopped after {len(res.samples[n])} samples: "
                            f"over {dominance:g}x slower than {best}")


def _settled(samples, active: list[str], winners: list[str | None], config: Stopping, prefer: str | None) -> bool:
    """The same winner for the last ``stable_rounds`` rounds, every active candidate sampled ``min_rounds``
    times, and the winner either PyTorch's pick (near-ties go to it anyway) or ahead of every other active
    candidate by more than either's spread."""
    if any(len(samples[n]) < config.min_rounds for n in active):
        return False
    if len(active) <= 1:
        return True
    k = config.stable_rounds
    if len(winners) < k or winners[-1] is None or len(set(winners[-k:])) != 1:
        return False
    w = winners[-1]
    if w == prefer:
        return True
    if w not in active:
        return False
    med_w, spread_w = summarize(samples[w])
    for n in active:
        if n != w:
            med, spread = summarize(samples[n])
            if med - med_w <= max(spread, spread_w):
                return False
    return True
