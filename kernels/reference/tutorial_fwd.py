"""The comparison kernel for ``scripts/compile_kernels.py``: a FlashAttention-2 forward written the way
Triton's fused-attention tutorial (``python/tutorials/06-fused-attention.py``) does it on Hopper, from the
published algorithm (not copied): Q/K/V/O through host tensor descriptors (TMA) over the sequence-flattened
``(B*H*L, D)`` tensors, the softmax scale folded into one FMA with the running max, causal attention in two
passes (off-band blocks with no mask, then the on-band blocks with the causal compare). It has none of the
project kernel's generality (no masks, GQA, ragged lengths, padded head dims: ``L`` must be a multiple of
``BLOCK_M`` and ``BLOCK_N``), so it is the bar the project's hot loop is measured against. Not shipped.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _ref_inner(acc, l_i, m_i, q, desc_k, desc_v, row0, lo, hi, offs_m, qk_scale,
               BLOCK_N: tl.constexpr, ON_BAND: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = desc_k.load([row0 + start_n, 0])
        qk = tl.dot(q, k.T)
        if ON_BAND:
            # scaled scores with a large negative bias past the diagonal (finite: no inf - inf)
            keep = offs_m[:, None] >= start_n + offs_n[None, :]
            qk = qk * qk_scale + tl.where(keep, 0.0, -1.0e6)
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_new[:, None]
        else:
            # the row max of the raw scores times the scale, then one FMA per score
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_new[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = desc_v.load([row0 + start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def tutorial_fwd_kernel(desc_q, desc_k, desc_v, desc_o, LSE, H, L, sm_scale,
                        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    row0 = off_bh * L                      # first row of this (batch, head) in the flattened tensors
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    q = desc_q.load([row0 + start_m * BLOCK_M, 0])
    if CAUSAL:
        acc, l_i, m_i = _ref_inner(acc, l_i, m_i, q, desc_k, desc_v, row0, 0, start_m * BLOCK_M, offs_m,
                                   qk_scale, BLOCK_N, False)
        acc, l_i, m_i = _ref_inner(acc, l_i, m_i, q, desc_k, desc_v, row0, start_m * BLOCK_M,
                                   (start_m + 1) * BLOCK_M, offs_m, qk_scale, BLOCK_N, True)
    else:
        acc, l_i, m_i = _ref_inner(acc, l_i, m_i, q, desc_k, desc_v, row0, 0, L, offs_m, qk_scale, BLOCK_N,
                                   False)
    tl.store(LSE + off_bh * L + offs_m, m_i + tl.math.log2(l_i))
    desc_o.store([row0 + start_m * BLOCK_M, 0], (acc / l_i[:, None]).to(desc_o.dtype))


def desc_maker(t, rows: int, cols: int):
    """Descriptor of a (B, H, L, D) tensor seen as (B*H*L, D) (it must be contiguous), box (rows, cols): what
    ``scripts/compile_kernels.py`` passes for ``desc_q/k/v/o`` (``Launch.call_args``)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    def make(x):
        flat = x.reshape(-1, x.shape[-1])
        return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [rows, cols])
    return make
