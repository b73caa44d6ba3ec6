"""Rows this process did not measure (shared and shipped layers) are claims: before the dispatcher trusts one
to pick a winner, the winner's output on the caller's inputs is checked against the reference, once per
problem per process. A failure becomes a local rejection, which beats any layer."""
from __future__ import annotations

import logging

import torch

from .backends.base import Backend, Call
from .reference import max_error, reference_attention, tolerance
from .store import Measurement

log = logging.getLogger("autosdpa")


def check_claim(call: Call, backend: Backend) -> Measurement | None:
    """None when ``backend`` computes this call correctly, else its rejection (status ``rejected``)."""
    q, k, v = (t.detach() for t in (call.query, call.key, call.value))
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[q.device] if q.is_cuda else []):
            out = backend.run(q, k, v, call.attn_mask, call.dropout_p, call.is_causal, call.scale, call.enable_gqa)
            if call.dropout_p > 0:  # random output: only finiteness can be checked
                ok = bool(torch.isfinite(out).all())
                err = None
            else:
                err = max_error(out, reference_attention(call))
                ok = err <= tolerance(call)
    except Exception as e:  # it cannot even run what it claims to run
        return Measurement(backend.name, "rejected", detail=f"shared row did not hold: {type(e).__name__}: "
                           f"{str(e).splitlines()[0][:300] if str(e) else ''}")
    if ok:
        return None
    log.warning("autosdpa: a shared tuning row for %s did not hold on this input (error %s); rejected locally",
                backend.name, err)
    return Measurement(backend.name, "rejected", max_error=err if err is not None and err < 1e6 else None,
                       detail="wrong result: a shared row claimed it, this process's check rejected it"
                       + (f" (error {err:.3g} vs tolerance {tolerance(call):.3g})" if err is not None else ""))
