"""Helpers shared by the dispatcher tests."""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from autosdpa.backends import Call
from autosdpa.backends.base import Backend
from autosdpa.dispatch import dispatcher
from autosdpa.problem import Problem
from autosdpa.store import Measurement

OPS = {"math": "aten::_scaled_dot_product_attention_math",
       "flash": "aten::_scaled_dot_product_flash_attention_for_cpu"}


def ran(fn, *args, **kwargs) -> set[str]:
    """Which PyTorch SDPA kernels ran (by profiler op name)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args, **kwargs)
    names = {e.key for e in prof.key_averages()}
    return {b for b, op in OPS.items() if op in names}


def qkv(L=16, D=8, H=2, B=1, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, D, generator=g).to(dtype) for _ in range(3))


def seed_measurements(q, k, v, times: dict[str, float], store=None, **kw) -> str:
    """Put 'ok' measurements for this call's problem into ``store`` (default: the user DB), as if tuned."""
    call = Call(q, k, v, **kw)
    key = Problem.from_call(call).key
    envs = dispatcher.environments(q.device)
    store = store or dispatcher.store()
    for name, t in times.items():
        fp, info = envs["torch" if name in ("math", "flash", "efficient", "cudnn") or name.startswith("njt_") else "kernels"]
        store.save(fp, info, key, [Measurement(name, "ok", t, 0.0, 10)])
    return key


class FakeBackend(Backend):
    """A backend made for tests: eligible everywhere, runs ``fn`` (default: PyTorch's math)."""

    torch_backend = None
    supports_grad = True

    def __init__(self, name, fn=None):
        self.name = name
        self.fn = fn
        self.runs = 0

    def not_supported_reasons(self, call):
        return []

    def run(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        self.runs += 1
        if self.fn is not None:
            return self.fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
