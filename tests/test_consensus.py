"""Rank consensus never makes a rank run a backend its own check rejected (issue 17, item 12): that rank keeps
its own winner, says so in the decision's reason, and warns once per process."""
from __future__ import annotations

import warnings

import pytest
import torch.nn.functional as F

import autosdpa
from autosdpa import consensus
from autosdpa.dispatch import dispatcher
from autosdpa.store import Measurement

from dispatch_helpers import qkv, ran, seed_measurements

WRONG = "wrong result: error 0.66 vs reference exceeds tolerance 1e-05"


@pytest.fixture
def rank1(monkeypatch):
    """This process is rank 1 of 2 (no process group needed: ranks that share a database agree through it)."""
    monkeypatch.setattr(consensus, "world", lambda: (1, 2))
    monkeypatch.setattr(consensus, "_warned", set())


def _decided_by_rank0(L: int, own: dict[str, float], rejected: tuple[str, ...], agreed: str) -> tuple:
    """This rank's own rows for a problem (``own`` ok, ``rejected`` wrong) and rank 0's decision ``agreed``."""
    q, k, v = qkv(L=L)
    key = seed_measurements(q, k, v, own)
    fp, info = dispatcher.environments(q.device)["torch"]
    for name in rejected:
        dispatcher.store().save(fp, info, key, [Measurement(name, "rejected", detail=WRONG)])
    assert dispatcher.store().decide(fp, info, key, agreed, decided_by="rank 0/2") == agreed
    return q, k, v


def test_a_rank_never_runs_the_agreed_backend_its_own_check_rejected(rank1):
    problems = [_decided_by_rank0(L, {"flash": 1e-3}, ("math",), "math") for L in (24, 40)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for q, k, v in problems:
            assert ran(autosdpa.sdpa, q, k, v) == {"flash"}
            d = autosdpa.explain(q, k, v)
            assert d.backend == "flash" and d.source != "agreed"
            assert "kept over the ranks' decision math, which this rank's check rejected" in d.reason
            assert "error 0.66" in d.reason
    said = [str(w.message) for w in caught if "own check rejected" in str(w.message)]
    assert len(said) == 1 and "keeps flash" in said[0]  # once per process, not once per problem


def test_an_agreed_backend_this_rank_did_not_reject_is_followed(rank1):
    q, k, v = _decided_by_rank0(56, {"flash": 1e-3, "math": 2e-3}, (), "math")
    out = autosdpa.sdpa(q, k, v)
    d = autosdpa.explain(q, k, v)
    assert d.backend == "math" and d.source == "agreed" and "own pick: flash" in d.reason
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() < 1e-5
