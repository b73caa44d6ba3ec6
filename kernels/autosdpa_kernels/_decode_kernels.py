"""Triton kernel for split-KV decoding (imported lazily; needs triton).

Grid (num_splits * B * Hkv,), splits fastest. One program owns one KV split of one KV head and *all* query rows
of that KV group (G query heads x Lq queries, packed into BLOCK_M rows), so each K/V tile is read once per group;
the online softmax is the forward kernel's (``_flash_kernels._fwd_inner``), K/V tiles through TMA descriptors
where they can be. With one split the program writes the output. With several, each writes a partial,
normalised output (fp32) and its log-sum-exp (log2 units, -inf when empty), then counts itself in a per-(batch,
KV head) counter; the last split to arrive combines them all and writes the output (no second kernel launch),
then puts the counter back to 0 for the next launch.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import interpreting
from ._flash_kernels import _fwd_inner, autotuned, desc_maker  # noqa: F401 (desc_maker: for launch.py)

NEG_INF = tl.constexpr(float("-inf"))  # a plain global is rejected by @jit (only constexpr globals)


@triton.jit
def _combine(po_base, plse_base, out_base, offs_r, out_off, row_ok, NUM_SPLITS, HEAD_DIM_V: tl.constexpr,
             DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """Weighted sum of the splits' partial outputs of each row (weights 2^(lse - max lse)); rows no split
    attended get 0. Partials are read through L2 (``.cg``): other programs wrote them during this launch."""
    m = tl.full([BLOCK_M], NEG_INF, dtype=tl.float32)
    lse_off = offs_r * NUM_SPLITS
    for s in tl.range(0, NUM_SPLITS, num_stages=1):
        m = tl.maximum(m, tl.load(plse_base + lse_off + s, mask=row_ok, other=NEG_INF, cache_modifier=".cg"))
    m = tl.where(m == NEG_INF, 0.0, m)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in tl.range(0, NUM_SPLITS, num_stages=1):
        den += tl.math.exp2(tl.load(plse_base + lse_off + s, mask=row_ok, other=NEG_INF, cache_modifier=".cg") - m)
    den = tl.where(den == 0.0, 1.0, den)
    offs_c = tl.arange(0, CHUNK)
    for c in tl.static_range(0, DV_PAD, CHUNK):   # column chunks: two (rows x CHUNK) fp32 tiles in registers
        out = tl.zeros([BLOCK_M, CHUNK], dtype=tl.float32)
        for s in tl.range(0, NUM_SPLITS, num_stages=1):
            w = tl.math.exp2(tl.load(plse_base + lse_off + s, mask=row_ok, other=NEG_INF, cache_modifier=".cg") - m)
            po = tl.load(po_base + ((lse_off + s) * DV_PAD)[:, None] + (c + offs_c)[None, :], mask=row_ok[:, None],
                         other=0.0, cache_modifier=".cg")
            out += w[:, None] * po
        out = out / den[:, None]
        tl.store(out_base + out_off[:, None] + (c + offs_c)[None, :], out.to(out_base.dtype.element_ty),
                 mask=row_ok[:, None] & (c + offs_c[None, :] < HEAD_DIM_V))


@triton.jit
def decode_split_kernel(Q, K, V, Msk, O, PO, PLSE, Locks,
                        stride_qb, stride_qh, stride_qm,
                        stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn,
                        stride_mb, stride_mh, stride_mm, stride_mn,
                        stride_ob, stride_oh, stride_om,
                        HQ, HKV, G, Lq, Lk, causal_off, qk_scale, split_len, NUM_SPLITS, K_BUCKET,
                        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr,
                        DV_PAD: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
                        NEG_SCALE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                        TMA: tl.constexpr, SPLIT: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # one flat grid axis, splits fastest (B * Hkv can pass the 65,535 limit of grid axes 1 and 2)
    pid = tl.program_id(0)
    split = pid % NUM_SPLITS
    off_bhk = tl.cast(pid // NUM_SPLITS, tl.int64)
    off_b = off_bhk // HKV
    off_hk = off_bhk % HKV

    offs_r = tl.arange(0, BLOCK_M)
    row_ok = offs_r < G * Lq
    off_h = off_hk * G + offs_r // Lq          # query head of each packed row
    off_i = offs_r % Lq                        # query position of each packed row
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)

    q = tl.load(Q + off_b * stride_qb + off_h[:, None] * stride_qh + off_i[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if TMA:   # K and V are tensor descriptors: no pointers into them (these are never read)
        k_base = Msk
        v_base = Msk
    else:
        k_base = K + off_b * stride_kb + off_hk * stride_kh
        v_base = V + off_b * stride_vb + off_hk * stride_vh
    m_rows = Msk + off_b * stride_mb + off_h[:, None] * stride_mh + off_i[:, None] * stride_mm
    m_off = tl.arange(0, BLOCK_N)[None, :] * stride_mn

    # keys [lo, hi) of this split: [lo, mid) in whole blocks every row sees (no checks), [mid, hi) checked
    lo = split * split_len
    hi = tl.minimum(lo + split_len, Lk)
    free = hi
    if CAUSAL:
        hi = tl.minimum(hi, tl.maximum(Lq + causal_off, 0))     # the last query's last key
        free = tl.minimum(hi, tl.maximum(causal_off + 1, 0))    # keys the first query sees too
    mid = tl.maximum(lo + ((free - lo) // BLOCK_N) * BLOCK_N, lo)

    m_i = tl.full([BLOCK_M], NEG_INF, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)
    b32, hk32 = off_b.to(tl.int32), off_hk.to(tl.int32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, k_base, v_base, m_rows, m_off, b32, hk32, lo, mid, off_i,
                               row_ok, offs_d, offs_dv, stride_kn, stride_vn, stride_mn, hi, causal_off, qk_scale,
                               HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, BLOCK_N, MASK_KIND, False, False, NEG_SCALE,
                               PRECISION, UPCAST, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, k_base, v_base, m_rows, m_off, b32, hk32, mid, hi, off_i,
                               row_ok, offs_d, offs_dv, stride_kn, stride_vn, stride_mn, hi, causal_off, qk_scale,
                               HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, BLOCK_N, MASK_KIND, CAUSAL, True, NEG_SCALE,
                               PRECISION, UPCAST, TMA)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    # the output is ours (contiguous (B, HQ, Lq, Dv)): a 64-bit base per program, 32-bit offsets per row (packed
    # rows are consecutive (head, position) rows of the KV group)
    out_base = O + off_b * stride_ob + (off_hk * G) * stride_oh
    out_off = (offs_r // Lq) * stride_oh + off_i * stride_om
    if SPLIT:
        # partials: (B, HQ, Lq, NUM_SPLITS[, DV_PAD]) contiguous; this KV group's G * Lq rows start at ``first``
        first = tl.cast(pid // NUM_SPLITS, tl.int64) * (G * Lq * NUM_SPLITS)
        tl.store(PLSE + first + offs_r * NUM_SPLITS + split, tl.where(empty, NEG_INF, m_i + tl.math.log2(l_safe)),
                 mask=row_ok)
        tl.store(PO + first * DV_PAD + ((offs_r * NUM_SPLITS + split) * DV_PAD)[:, None] + offs_dv[None, :], acc,
                 mask=row_ok[:, None])
        # every thread's partial precedes the arrival (a CTA barrier, then one release at GPU scope)
        tl.debug_barrier()
        lock = Locks + pid // NUM_SPLITS
        arrived = tl.atomic_add(lock, 1, sem="acq_rel")
        if arrived == NUM_SPLITS - 1:   # the last split of this (batch, KV head): combine, reset the counter
            tl.atomic_xchg(lock, 0, sem="relaxed")
            _combine(PO + first * DV_PAD, PLSE + first, out_base, offs_r, out_off, row_ok, NUM_SPLITS, HEAD_DIM_V,
                     DV_PAD, BLOCK_M, CHUNK)
    else:
        tl.store(out_base + out_off[:, None] + offs_dv[None, :], acc.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


SPLIT_KEY = ["HEAD_DIM", "HEAD_DIM_V", "MASK_KIND", "CAUSAL", "BLOCK_M", "K_BUCKET", "NUM_SPLITS", "PRECISION"]
AUTOTUNED = {} if interpreting() else {"split": autotuned(decode_split_kernel, "split", SPLIT_KEY),
                                       "split_tma": autotuned(decode_split_kernel, "split", SPLIT_KEY,
                                                              (("K", "BLOCK_N"), ("V", "BLOCK_N")))}
