"""Explicit, collective synchronisation of rank decisions (see ``autosdpa.consensus`` for the design).

Ranks that share one database agree by themselves (first writer wins in the ``decision`` table). Ranks on
different nodes with separate databases call ``sync_decisions()`` at a safe point that every rank reaches
(after the first step, after warm-up), like any other collective::

    import autosdpa.distributed
    model(batch)                             # first step: each rank tunes and decides
    autosdpa.distributed.sync_decisions()    # every rank: rank 0's decisions, then the lowest rank's, win

Payloads are JSON (never pickle) and are validated on receipt.
"""
from __future__ import annotations

import json

from .records import ENV_FIELDS
from .store import Store
from .validation import backend_name_error, environment_error, key_error


def _gather_bytes(payload: bytes, group) -> list[bytes]:
    import torch
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    size = dist.get_world_size(group)
    n = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(sizes, n, group=group)
    longest = max(int(s.item()) for s in sizes)
    buf = torch.zeros(longest, dtype=torch.uint8, device=device)
    if payload:
        buf[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    bufs = [torch.zeros_like(buf) for _ in range(size)]
    dist.all_gather(bufs, buf, group=group)
    return [bytes(b[:int(s.item())].cpu().tolist()) for b, s in zip(bufs, sizes)]


def _valid(dec) -> bool:
    if not isinstance(dec, dict):
        return False
    info = dec.get("info")
    return (backend_name_error(dec.get("backend")) is None
            and isinstance(dec.get("decided_at"), (int, float)) and not isinstance(dec.get("decided_at"), bool)
            and 0 <= dec["decided_at"] < 1e11
            and key_error(dec.get("problem_key")) is None
            and isinstance(info, dict) and environment_error({"fingerprint": dec.get("fingerprint"), **info}) is None)


def sync_decisions(group=None, *, store: Store | None = None) -> int:
    """Collective: make every rank's decisions equal to rank 0's (for problems rank 0 has not decided, the
    lowest rank that has). Every rank of ``group`` must call it. Returns how many decisions this rank changed
    or added. A no-op without torch.distributed."""
    import torch.distributed as dist

    from .dispatch import dispatcher
    from .consensus import world

    if world() is None:
        return 0
    store = store or dispatcher.store()
    envs = {e["fingerprint"]: {f: e[f] for f in ENV_FIELDS} for e in store.environments()}
    mine = [{**d, "info": envs.get(d["fingerprint"])} for d in store.decisions()]
    payloads = _gather_bytes(json.dumps(mine).encode(), group)
    merged: dict[tuple[str, str], dict] = {}
    for raw in payloads:  # group rank order: rank 0 first
        try:
            decs = json.loads(raw.decode() or "[]")
        except (UnicodeDecodeError, ValueError):
            continue
        for dec in decs if isinstance(decs, list) else []:
            if _valid(dec):
                merged.setdefault((dec["fingerprint"], dec["problem_key"]), dec)
    current = {(d["fingerprint"], d["problem_key"]): d["backend"] for d in mine}
    changed = [d for k, d in merged.items() if current.get(k) != d["backend"]]
    try:
        n = store.set_decisions(changed) if changed else 0
    finally:
        dist.barrier(group=group)  # even when this rank failed: the others must not wait forever
    if n:
        dispatcher.clear_plans()  # the next call of each problem re-decides and reads the agreed backend
    return n
