"""Rank-consistent decisions: every rank of a distributed job must route a problem to the same backend.

``agree(store, fingerprint, key, winner, eligible)`` is called by the dispatcher after it picked ``winner``
among ``eligible`` for an unrestricted problem; it returns the backend to use.
"""
from __future__ import annotations


def agree(store, fingerprint: str, key: str, winner: str, eligible: list[str]) -> str:
    return winner
