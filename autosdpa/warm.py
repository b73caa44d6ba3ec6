"""Warm start: rows of one problem measured on the same hardware under other software (another torch, CUDA,
cuDNN or Triton, so another fingerprint) cannot decide here, but they can rank the candidates.

Tuning then times only the candidates within ``MARGIN`` of the best one there, PyTorch's own pick (the baseline),
and any candidate the other environment never measured; the rest get a ``skipped`` row saying why, so the
problem is not tuned again. Every candidate timed is still checked against the reference; when none of them
passes, the dispatcher times the skipped ones after all. ``AUTOSDPA_WARM_START=0`` (or ``tune --force``) times
everything.
"""
from __future__ import annotations

from .records import Measurement
from .sharing import env_change

MARGIN = 0.25  # more than 25% slower than the best on the same hardware elsewhere: not worth timing here


def split(candidates: list[str], near: dict[str, tuple[Measurement, dict]], pytorch_choice: str | None,
          here: dict[str, dict], margin: float = MARGIN) -> tuple[list[str], dict[str, str]]:
    """(names to time, {name: why it is not timed}) among ``candidates``, from ``near`` ({backend: (row, its
    environment)}, see ``Store.near_rows``) and ``here`` ({backend: the fields of its environment here})."""
    ok = {n: near[n][0] for n in candidates if n in near and near[n][0].ok}
    if not ok:
        return list(candidates), {}
    best = min(ok, key=lambda n: ok[n].median_s)
    limit = ok[best].median_s * (1 + margin)
    keep = [n for n in candidates
            if n not in near or n == pytorch_choice or (n in ok and ok[n].median_s <= limit)]
    why = {}
    for n in candidates:
        if n in keep:
            continue
        row, env = near[n]
        rank = (f"{row.median_s / ok[best].median_s:.2f}x slower than {best}" if n in ok
                else f"{row.status} ({row.detail[:80] or 'no detail'})")
        why[n] = f"not timed (warm start): {rank} on this hardware with {env_change(env, here.get(n, {}))}"
    return keep, why
