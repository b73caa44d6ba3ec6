"""Triton kernels for split-KV decoding (imported lazily; needs triton).

Stage 1: grid (num_splits * B * Hkv,), splits fastest. One program owns one KV split of one KV head and *all*
query rows of that KV group (G query heads x Lq queries, packed into BLOCK_M rows), so each K/V tile is read once
per group. It writes a partial, normalised output (fp32) and its log-sum-exp (log2 units, -inf when empty) per split.
Stage 2: grid (B * Hq * Lq,). Combines the splits with log-sum-exp weights.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import interpreting
from ._flash_kernels import _apply_mask, autotuned

NEG_INF = tl.constexpr(float("-inf"))  # a plain global is rejected by @jit (only constexpr globals)


@triton.jit
def decode_split_kernel(Q, K, V, Msk, PO, PLSE,
                        stride_qb, stride_qh, stride_qm,
                        stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn,
                        stride_mb, stride_mh, stride_mm, stride_mn,
                        HQ, HKV, G, Lq, Lk, causal_off, qk_scale, split_len, NUM_SPLITS, K_BUCKET,
                        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr,
                        DV_PAD: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
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
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    m_rows = Msk + off_b * stride_mb + off_h[:, None] * stride_mh + off_i[:, None] * stride_mm

    lo = split * split_len
    hi = tl.minimum(lo + split_len, Lk)
    if CAUSAL:
        hi = tl.minimum(hi, tl.maximum(Lq + causal_off, 0))

    m_i = tl.full([BLOCK_M], NEG_INF, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    kt_off = offs_n0[None, :] * stride_kn + offs_d[:, None]
    v_off = offs_n0[:, None] * stride_vn + offs_dv[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n64 = tl.cast(start_n, tl.int64)  # Lk * stride can pass 2^31
        col_ok = offs_n < hi
        kt = tl.load(k_base + n64 * stride_kn + kt_off,
                     mask=col_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        v = tl.load(v_base + n64 * stride_vn + v_off,
                    mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        if MASK_KIND != 0:
            mp = m_rows + n64 * stride_mn + offs_n0[None, :] * stride_mn
            mm = row_ok[:, None] & col_ok[None, :]
            s = _apply_mask(s, mp, mm, MASK_KIND)
        if CAUSAL:
            s = tl.where(offs_n[None, :] <= off_i[:, None] + causal_off, s, NEG_INF)
        s = tl.where(col_ok[None, :], s, NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, NEG_INF, m_i + tl.math.log2(l_safe))
    # partial buffers: (B, HQ, Lq, NUM_SPLITS[, DV_PAD]) contiguous
    row = ((off_b * HQ + off_h) * Lq + off_i) * NUM_SPLITS + split
    tl.store(PLSE + row, lse, mask=row_ok)
    tl.store(PO + row[:, None] * DV_PAD + offs_dv[None, :], acc, mask=row_ok[:, None])


@triton.jit
def decode_combine_kernel(PO, PLSE, O, stride_ob, stride_oh, stride_om, HQ, Lq, NUM_SPLITS,
                          HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr, S_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)   # (b * HQ + h) * Lq + i
    off_i = row % Lq
    off_bh = row // Lq
    off_h = off_bh % HQ
    off_b = off_bh // HQ
    offs_s = tl.arange(0, S_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    s_ok = offs_s < NUM_SPLITS
    lse = tl.load(PLSE + row * NUM_SPLITS + offs_s, mask=s_ok, other=NEG_INF)
    m = tl.max(lse, 0)
    m_safe = tl.where(m == NEG_INF, 0.0, m)
    w = tl.math.exp2(lse - m_safe)
    denom = tl.sum(w, 0)
    po = tl.load(PO + (row * NUM_SPLITS + offs_s)[:, None] * DV_PAD + offs_dv[None, :], mask=s_ok[:, None],
                 other=0.0)
    out = tl.sum(w[:, None] * po, 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(O + off_b * stride_ob + off_h * stride_oh + off_i * stride_om + offs_dv,
             out.to(O.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)


SPLIT_KEY = ["HEAD_DIM", "HEAD_DIM_V", "MASK_KIND", "CAUSAL", "BLOCK_M", "K_BUCKET", "NUM_SPLITS", "PRECISION"]
AUTOTUNED = {} if interpreting() else {"split": autotuned(decode_split_kernel, "split", SPLIT_KEY)}
