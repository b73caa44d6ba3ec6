"""Rank-consistent decisions: every rank of a distributed job must route a problem to the same backend.

``agree(store, fingerprint, info, key, winner, eligible)`` is called by the dispatcher after it picked ``winner``
among ``eligible`` for an unrestricted problem; it returns the backend to use.

Design: no collectives here. The dispatcher reaches this on a *miss*, and ranks may miss on different calls
(different sequence lengths, a rank that skips a layer), so a collective in this path could deadlock. Instead
the store keeps a ``decision`` table (environment, problem key) -> backend with first-writer-wins
insert-if-absent semantics: the first rank to decide a problem fixes it, the others read it. Ranks that share
one database (one SQLite file on a node, or a PostgreSQL server for the fleet) agree without talking. Ranks with
separate databases call the collective ``autosdpa.distributed.sync_decisions()`` at a safe point.

When the agreed backend cannot run this rank's tensors (not in ``eligible``), or this rank's own check rejected
it (a wrong result, an error: ``rejected``), the rank keeps its own winner: correctness first. A rank never
runs a backend it rejected; the price is that its numbers may differ slightly from the other ranks', which one
warning per process says. Without torch.distributed (or with world size 1) this is one cheap check.
"""
from __future__ import annotations

import logging
import os
import socket
import warnings

log = logging.getLogger("autosdpa")
_warned: set[str] = set()


def world() -> tuple[int, int] | None:
    """(rank, world size) when torch.distributed is initialized, else None."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # a half-torn-down process group: behave as not distributed
        pass
    return None


def agree(store, fingerprint: str, info: dict, key: str, winner: str, eligible: list[str],
          rejected: dict[str, str] | None = None) -> tuple[str, str | None]:
    """(the backend to use, None; or this rank's ``winner`` and why it did not follow the ranks' decision).
    ``rejected``: {backend: why} of the backends this rank's own measurements rejected."""
    w = world()
    if w is None or w[1] <= 1:
        return winner, None
    rank, size = w
    try:
        agreed = store.decide(fingerprint, info, key, winner,
                              decided_by=f"rank {rank}/{size} pid {os.getpid()} on {socket.gethostname()}")
    except Exception as e:  # never break the caller's run: decide alone, and say so once
        _warn_once("agree", f"autosdpa: cannot record rank decisions ({e}); ranks may choose different backends")
        return winner, None
    if agreed is None or agreed == winner:
        return winner, None
    if agreed not in eligible:
        log.info("autosdpa: agreed backend %s cannot run these inputs on rank %d; using %s", agreed, rank, winner)
        return winner, None
    why = (rejected or {}).get(agreed)
    if why is not None:
        _warn_once("rejected", f"autosdpa: the ranks agreed on {agreed} for {key}, but rank {rank}'s own check "
                               f"rejected it ({why}); this rank keeps {winner}, so its numbers may differ slightly "
                               "from the other ranks' (said once per process)")
        return winner, f"kept over the ranks' decision {agreed}, which this rank's check rejected ({why})"
    return agreed, None


def _warn_once(kind: str, message: str) -> None:
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
