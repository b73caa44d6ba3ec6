"""Triton kernels for FlashAttention-2 style forward and backward (imported lazily; needs triton).

Conventions shared by every kernel here:

* scores are kept in log2 units: ``s = (q . k) * scale * log2(e) + mask * log2(e)`` so the softmax uses
  ``exp2``; the saved log-sum-exp ``lse`` is in the same units (``+inf`` for a row with nothing to attend,
  which makes every recomputed probability of that row 0 in the backward pass).
* head dims are padded to a power of two (``D_PAD``/``DV_PAD``); loads are masked on the real dim.
* the last dim of q/k/v/o/do has unit stride; every other stride is passed (0 for broadcast mask dims).
* causal: query ``i`` sees key ``j`` iff ``j <= i + causal_off`` (0 top-left, ``Lk - Lq`` bottom-right).
* GQA: query head ``h`` reads kv head ``h // G``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import interpreting

NEG_INF = tl.constexpr(float("-inf"))  # a plain global is rejected by @jit (only constexpr globals)


@triton.jit
def _apply_mask(s, ptrs, valid, MASK_KIND: tl.constexpr):
    """Scores (log2 units) with the attention-mask tile at ``ptrs`` applied: a bool mask sets -inf where it is
    False (1), a float mask is added (2). ``valid`` masks the load at ragged edges."""
    LOG2E: tl.constexpr = 1.4426950408889634
    if MASK_KIND == 1:
        mb = tl.load(ptrs, mask=valid, other=0)
        s = tl.where(mb != 0, s, NEG_INF)
    else:
        mb = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
        s = s + mb * LOG2E
    return s


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, m_base, lo, hi, offs_m, offs_d, offs_dv,
               stride_kn, stride_vn, stride_mm, stride_mn, Lq, Lk, causal_off, qk_scale,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr,
               DV_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
               APPLY_CAUSAL: tl.constexpr, BOUNDS: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Lq
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        # K^T tile (D_PAD, BLOCK_N)
        kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None]
        if BOUNDS:
            if HEAD_DIM == D_PAD:
                kt = tl.load(kt_ptrs, mask=offs_n[None, :] < Lk, other=0.0)
            else:
                kt = tl.load(kt_ptrs, mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        else:
            if HEAD_DIM == D_PAD:
                kt = tl.load(kt_ptrs)
            else:
                kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        if MASK_KIND != 0:
            mp = m_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
            if BOUNDS:
                mm = row_ok[:, None] & (offs_n[None, :] < Lk)
            else:
                mm = row_ok[:, None]
            qk = _apply_mask(qk, mp, mm, MASK_KIND)
        if APPLY_CAUSAL:
            qk = tl.where(offs_n[None, :] <= offs_m[:, None] + causal_off, qk, NEG_INF)
        if BOUNDS:
            qk = tl.where(offs_n[None, :] < Lk, qk, NEG_INF)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_dv[None, :]
        if BOUNDS:
            if HEAD_DIM_V == DV_PAD:
                v = tl.load(v_ptrs, mask=offs_n[:, None] < Lk, other=0.0)
            else:
                v = tl.load(v_ptrs, mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        else:
            if HEAD_DIM_V == DV_PAD:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd_kernel(Q, K, V, Msk, O, LSE,
                    stride_qb, stride_qh, stride_qm,
                    stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn,
                    stride_mb, stride_mh, stride_mm, stride_mn,
                    stride_ob, stride_oh, stride_om,
                    H, G, Lq, Lk, causal_off, qk_scale, Q_BUCKET, K_BUCKET,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr,
                    DV_PAD: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DCLASS: tl.constexpr = "s"):
    if CAUSAL:
        # heaviest (bottom) query blocks first for better load balance
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // G

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    row_ok = offs_m < Lq

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    if HEAD_DIM == D_PAD:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    m_base = Msk + off_b * stride_mb + off_h * stride_mh

    m_i = tl.full([BLOCK_M], NEG_INF, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)

    if CAUSAL:
        hi = tl.minimum(Lk, (start_m + 1) * BLOCK_M + causal_off)
        hi = tl.maximum(hi, 0)
        full = tl.maximum(start_m * BLOCK_M + causal_off + 1, 0)
        full = tl.minimum(full, Lk)
        full = (full // BLOCK_N) * BLOCK_N
    else:
        hi = Lk
        full = (Lk // BLOCK_N) * BLOCK_N
    # blocks that need neither causal nor bounds masking
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, m_base, 0, full, offs_m, offs_d, offs_dv,
                               stride_kn, stride_vn, stride_mm, stride_mn, Lq, Lk, causal_off, qk_scale,
                               HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, BLOCK_N, MASK_KIND,
                               False, False, PRECISION, UPCAST)
    # diagonal / ragged-tail blocks
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, m_base, full, hi, offs_m, offs_d, offs_dv,
                               stride_kn, stride_vn, stride_mm, stride_mn, Lq, Lk, causal_off, qk_scale,
                               HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, BLOCK_N, MASK_KIND,
                               CAUSAL, True, PRECISION, UPCAST)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + off_bh * Lq + offs_m, lse, mask=row_ok)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :]
    if HEAD_DIM_V == DV_PAD:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def bwd_preprocess_kernel(O, DO, Delta, stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm,
                          H, Lq, HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // H
    off_h = off_bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, DV_PAD)
    msk = (offs_m[:, None] < Lq) & (offs_dv[None, :] < HEAD_DIM_V)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :],
                mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_db + off_h * stride_dh + offs_m[:, None] * stride_dm + offs_dv[None, :],
                 mask=msk, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(Delta + off_bh * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, m_base, lse_base, delta_base, lo, hi, offs_n, offs_d, offs_dv,
                    stride_qm, stride_dom, stride_mm, stride_mn, Lq, Lk, causal_off, qk_scale,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr,
                    DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, MASK_KIND: tl.constexpr,
                    APPLY_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    offs_m0 = tl.arange(0, BLOCK_M)
    col_ok = offs_n < Lk
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        row_ok = offs_m < Lq
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_dv[None, :],
                     mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        if MASK_KIND != 0:
            mp = m_base + offs_m[None, :] * stride_mm + offs_n[:, None] * stride_mn
            mm = row_ok[None, :] & col_ok[:, None]
            st = _apply_mask(st, mp, mm, MASK_KIND)
        pt = tl.math.exp2(st - lse[None, :])
        if APPLY_CAUSAL:
            pt = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_off, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(Q, K, V, Msk, DO, LSE, Delta, DK, DV,
                         stride_qb, stride_qh, stride_qm,
                         stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn,
                         stride_mb, stride_mh, stride_mm, stride_mn,
                         stride_dob, stride_doh, stride_dom,
                         stride_dkb, stride_dkh, stride_dkn,
                         stride_dvb, stride_dvh, stride_dvn,
                         H, HKV, G, Lq, Lk, causal_off, qk_scale, sm_scale, Q_BUCKET, K_BUCKET,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr,
                         DV_PAD: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
                         PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DCLASS: tl.constexpr = "s"):
    start_n = tl.program_id(0) * BLOCK_N
    off_bhk = tl.program_id(1).to(tl.int64)
    off_b = off_bhk // HKV
    off_hk = off_bhk % HKV
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    col_ok = offs_n < Lk

    k = tl.load(K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    v = tl.load(V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :],
                mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], dtype=tl.float32)

    m_end = tl.cdiv(Lq, BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = tl.maximum(start_n - causal_off, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        mid = tl.maximum(start_n + BLOCK_N - 1 - causal_off, 0)
        mid = tl.cdiv(mid, BLOCK_M) * BLOCK_M
        mid = tl.minimum(mid, m_end)
        lo = tl.minimum(lo, mid)
    else:
        lo = 0
        mid = 0

    for g in range(0, G):
        off_h = off_hk * G + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        m_base = Msk + off_b * stride_mb + off_h * stride_mh
        lse_base = LSE + (off_b * H + off_h) * Lq
        delta_base = Delta + (off_b * H + off_h) * Lq
        if CAUSAL:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, m_base, lse_base, delta_base, lo, mid,
                                     offs_n, offs_d, offs_dv, stride_qm, stride_dom, stride_mm, stride_mn,
                                     Lq, Lk, causal_off, qk_scale, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD,
                                     BLOCK_M, MASK_KIND, True, PRECISION, UPCAST)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, m_base, lse_base, delta_base, mid, m_end,
                                 offs_n, offs_d, offs_dv, stride_qm, stride_dom, stride_mm, stride_mn,
                                 Lq, Lk, causal_off, qk_scale, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD,
                                 BLOCK_M, MASK_KIND, False, PRECISION, UPCAST)

    dk = dk * sm_scale
    tl.store(DK + off_b * stride_dkb + off_hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + off_b * stride_dvb + off_hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, m_base, lo, hi, offs_m, offs_d, offs_dv,
                  stride_kn, stride_vn, stride_mm, stride_mn, Lq, Lk, causal_off, qk_scale,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr,
                  DV_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
                  APPLY_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Lq
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < Lk
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None],
                     mask=col_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * stride_vn + offs_dv[:, None],
                     mask=col_ok[None, :] & (offs_dv[:, None] < HEAD_DIM_V), other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        if MASK_KIND != 0:
            mp = m_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
            mm = row_ok[:, None] & col_ok[None, :]
            s = _apply_mask(s, mp, mm, MASK_KIND)
        p = tl.math.exp2(s - lse[:, None])
        if APPLY_CAUSAL:
            p = tl.where(offs_n[None, :] <= offs_m[:, None] + causal_off, p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
    return dq


@triton.jit
def attn_bwd_dq_kernel(Q, K, V, Msk, DO, LSE, Delta, DQ,
                       stride_qb, stride_qh, stride_qm,
                       stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn,
                       stride_mb, stride_mh, stride_mm, stride_mn,
                       stride_dob, stride_doh, stride_dom,
                       stride_dqb, stride_dqh, stride_dqm,
                       H, G, Lq, Lk, causal_off, qk_scale, sm_scale, Q_BUCKET, K_BUCKET,
                       HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr,
                       DV_PAD: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DCLASS: tl.constexpr = "s"):
    if CAUSAL:
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // G
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    row_ok = offs_m < Lq

    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + off_bh * Lq + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + off_bh * Lq + offs_m, mask=row_ok, other=0.0)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    m_base = Msk + off_b * stride_mb + off_h * stride_mh
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    if CAUSAL:
        hi = tl.minimum(Lk, (start_m + 1) * BLOCK_M + causal_off)
        hi = tl.maximum(hi, 0)
        full = tl.maximum(start_m * BLOCK_M + causal_off + 1, 0)
        full = tl.minimum(full, Lk)
        full = (full // BLOCK_N) * BLOCK_N
    else:
        hi = Lk
        full = Lk
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, m_base, 0, full, offs_m, offs_d, offs_dv,
                       stride_kn, stride_vn, stride_mm, stride_mn, Lq, Lk, causal_off, qk_scale,
                       HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, BLOCK_N, MASK_KIND, False, PRECISION, UPCAST)
    if CAUSAL:
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, m_base, full, hi, offs_m, offs_d, offs_dv,
                           stride_kn, stride_vn, stride_mm, stride_mn, Lq, Lk, causal_off, qk_scale,
                           HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, BLOCK_N, MASK_KIND, True, PRECISION, UPCAST)
    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------------------------
# autotuning (CUDA only; the interpreter gets one fixed config)
# ----------------------------------------------------------------------------------------------
def _max_shared_mem(device_index: int) -> int:
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(device_index)
        return int(props["max_shared_mem"])
    except Exception:  # pragma: no cover - driver specific
        return 99 * 1024


def _dclass(d_pad: int, dv_pad: int) -> str:
    d = max(d_pad, dv_pad)
    return "s" if d <= 128 else ("m" if d <= 256 else "l")


def _prune_factory(kind: str):
    """Keep the configs meant for this head-dim class whose shared memory fits the device and whose tiles
    are not larger than the (bucketed) problem; never return an empty list."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        q = args["Q"]
        esize = 4 if args.get("UPCAST", False) else q.element_size()
        d_pad, dv_pad = args["D_PAD"], args["DV_PAD"]
        lq_b, lk_b = args["Q_BUCKET"], args["K_BUCKET"]
        dcls = _dclass(d_pad, dv_pad)
        smem_limit = _max_shared_mem(q.device.index or 0)
        same_class = [c for c in configs if c.kwargs.get("DCLASS", "s") == dcls] or list(configs)
        kept = []
        for c in same_class:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            st = max(1, c.num_stages)
            if kind == "fwd":
                smem = (bm * d_pad + st * bn * (d_pad + dv_pad)) * esize
            elif kind == "dkdv":
                smem = (bn * (d_pad + dv_pad) + st * bm * (d_pad + dv_pad)) * esize
            else:  # dq
                smem = (bm * (d_pad + dv_pad) + st * bn * (d_pad + dv_pad)) * esize
            if smem > smem_limit:
                continue
            if bm > max(16, lq_b) or bn > max(16, lk_b):
                continue
            kept.append(c)
        if len(kept) > 1 and min(lq_b, lk_b) >= 64:
            # the 16x16 tile is only a fallback for tiny problems
            kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 256] or kept
        if not kept:
            kept = [min(same_class, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]
        return kept

    return prune


def _cfgs(table):
    out = []
    for dcls, items in table.items():
        for bm, bn, w, s in items:
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "DCLASS": dcls}, num_warps=w, num_stages=s))
    return out


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head-dim class: s <= 128, m = 256, l = 512
FWD_CONFIGS = {
    "s": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4),
          (128, 64, 8, 4), (16, 16, 4, 1)],
    "m": [(64, 32, 4, 2), (64, 64, 8, 2), (64, 32, 8, 3), (128, 32, 8, 2), (32, 32, 4, 2), (16, 16, 4, 1)],
    "l": [(32, 32, 4, 1), (64, 32, 8, 1), (32, 16, 4, 2), (64, 16, 8, 2), (16, 16, 4, 1)],
}
DKDV_CONFIGS = {
    "s": [(32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2), (16, 64, 4, 3),
          (16, 16, 4, 1)],
    "m": [(16, 64, 4, 2), (32, 64, 8, 2), (16, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)],
    "l": [(16, 32, 4, 1), (16, 32, 8, 1), (16, 16, 4, 1)],
}
DQ_CONFIGS = {
    "s": [(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2), (64, 16, 4, 3),
          (16, 16, 4, 1)],
    "m": [(64, 16, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 1), (16, 16, 4, 1)],
    "l": [(32, 16, 4, 1), (32, 16, 8, 1), (16, 16, 4, 1)],
}
TUNE_KEY = ["HEAD_DIM", "HEAD_DIM_V", "MASK_KIND", "CAUSAL", "Q_BUCKET", "K_BUCKET", "PRECISION"]

INTERPRET_FWD = {"BLOCK_M": 16, "BLOCK_N": 16}
INTERPRET_BWD = {"BLOCK_M": 16, "BLOCK_N": 16}


def _autotuned(kernel, configs, kind):
    return triton.autotune(configs=_cfgs(configs), key=TUNE_KEY, cache_results=True,
                           prune_configs_by={"early_config_prune": _prune_factory(kind)})(kernel)


if interpreting():
    fwd = bwd_dkdv = bwd_dq = None
else:
    fwd = _autotuned(attn_fwd_kernel, FWD_CONFIGS, "fwd")
    bwd_dkdv = _autotuned(attn_bwd_dkdv_kernel, DKDV_CONFIGS, "dkdv")
    bwd_dq = _autotuned(attn_bwd_dq_kernel, DQ_CONFIGS, "dq")
