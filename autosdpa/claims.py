"""Rows this process did not measure (shared and shipped layers) are claims: before the dispatcher trusts one
to pick a winner, the winner is checked on the caller's inputs, once per problem per process, exactly as local
tuning checks a candidate (``checks.Check``: one reference, its tolerance, GRAD_FACTOR for gradients). When the
call needs gradients the backward is checked too: a backend right forward and wrong backward must not train.
A failure becomes a local rejection, which beats any layer."""
from __future__ import annotations

import logging

import torch

from .backends.base import Backend, Call
from .checks import Check
from .store import Measurement
from .tuner import _inputs, _timed_fn  # the tuner's own call of a candidate: what a plan runs, + backward

log = logging.getLogger("autosdpa")


def check_claim(call: Call, backend: Backend) -> Measurement | None:
    """None when ``backend`` computes this call correctly (output, and gradients when ``call.needs_grad``),
    else its rejection (status ``rejected``). The caller's tensors are only read: no graph is built on them."""
    try:
        with torch.random.fork_rng(devices=[call.query.device] if call.query.is_cuda else []):
            q, k, v, xs, grad_out = _inputs(call)
            check = Check(call, grad_out)
            out, grads = _timed_fn(backend, call, (q, k, v), xs, grad_out, None)()
            err, reason = check.judge(out, grads)
    except Exception as e:  # it cannot even run what it claims to run
        return Measurement(backend.name, "rejected", detail=f"shared row did not hold: {type(e).__name__}: "
                           f"{str(e).splitlines()[0][:300] if str(e) else ''}")
    if reason is None:
        return None
    what = "output or gradients" if call.needs_grad else "output"
    log.warning("autosdpa: a shared tuning row for %s did not hold on this input (%s: %s); rejected locally",
                backend.name, what, reason)
    return Measurement(backend.name, "rejected", max_error=err if err is not None and err < 1e6 else None,
                       detail=f"shared row did not hold: a shared row claimed it, this process's check of its "
                       f"{what} rejected it ({reason})")
