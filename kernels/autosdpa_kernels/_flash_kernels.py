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

from . import configs as KC
from . import launch as KL
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
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, m_rows, lo, hi, offs_m, offs_d, offs_dv, kt_off, v_off, m_off,
               stride_kn, stride_vn, stride_mn, Lq, Lk, causal_off, qk_scale,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr,
               DV_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
               APPLY_CAUSAL: tl.constexpr, BOUNDS: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Lq
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n64 = tl.cast(start_n, tl.int64)  # block start in 64 bits: Lk * stride can pass 2^31
        # K^T tile (D_PAD, BLOCK_N)
        kt_ptrs = k_base + n64 * stride_kn + kt_off
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
            mp = m_rows + n64 * stride_mn + m_off
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
        v_ptrs = v_base + n64 * stride_vn + v_off
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
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # one flat grid axis, query blocks fastest: the blocks running together share K/V in L2
    n_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    off_bh = tl.cast(pid // n_m, tl.int64)
    start_m = pid % n_m
    if CAUSAL:
        start_m = n_m - 1 - start_m  # heaviest (bottom) query blocks first for better load balance
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // G

    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_m = start_m * BLOCK_M + offs_m0
    m64 = tl.cast(start_m * BLOCK_M, tl.int64)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    row_ok = offs_m < Lq

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + m64 * stride_qm + offs_m0[:, None] * stride_qm \
        + offs_d[None, :]
    if HEAD_DIM == D_PAD:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    m_rows = Msk + off_b * stride_mb + off_h * stride_mh + m64 * stride_mm
    kt_off = offs_n0[None, :] * stride_kn + offs_d[:, None]
    v_off = offs_n0[:, None] * stride_vn + offs_dv[None, :]
    m_off = offs_m0[:, None] * stride_mm + offs_n0[None, :] * stride_mn

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
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, m_rows, 0, full, offs_m, offs_d, offs_dv,
                               kt_off, v_off, m_off, stride_kn, stride_vn, stride_mn, Lq, Lk, causal_off,
                               qk_scale, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, BLOCK_N, MASK_KIND,
                               False, False, PRECISION, UPCAST)
    # diagonal / ragged-tail blocks
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, m_rows, full, hi, offs_m, offs_d, offs_dv,
                               kt_off, v_off, m_off, stride_kn, stride_vn, stride_mn, Lq, Lk, causal_off,
                               qk_scale, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, BLOCK_N, MASK_KIND,
                               CAUSAL, True, PRECISION, UPCAST)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + off_bh * Lq + offs_m, lse, mask=row_ok)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + m64 * stride_om + offs_m0[:, None] * stride_om \
        + offs_dv[None, :]
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
    n_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    off_bh = tl.cast(pid // n_m, tl.int64)
    start_m = pid % n_m
    off_b = off_bh // H
    off_h = off_bh % H
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_m = start_m * BLOCK_M + offs_m0
    m64 = tl.cast(start_m * BLOCK_M, tl.int64)
    offs_dv = tl.arange(0, DV_PAD)
    msk = (offs_m[:, None] < Lq) & (offs_dv[None, :] < HEAD_DIM_V)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + m64 * stride_om + offs_m0[:, None] * stride_om
                + offs_dv[None, :], mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_db + off_h * stride_dh + m64 * stride_dm + offs_m0[:, None] * stride_dm
                 + offs_dv[None, :], mask=msk, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(Delta + off_bh * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, m_cols, lse_base, delta_base, lo, hi, offs_n, offs_d, offs_dv,
                    stride_qm, stride_dom, stride_mm, stride_mn, Lq, Lk, causal_off, qk_scale,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr,
                    DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASK_KIND: tl.constexpr, APPLY_CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    col_ok = offs_n < Lk
    q_off = offs_m0[:, None] * stride_qm + offs_d[None, :]
    do_off = offs_m0[:, None] * stride_dom + offs_dv[None, :]
    m_off = offs_m0[None, :] * stride_mm + offs_n0[:, None] * stride_mn
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        m64 = tl.cast(start_m, tl.int64)
        row_ok = offs_m < Lq
        q = tl.load(q_base + m64 * stride_qm + q_off,
                    mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        do = tl.load(do_base + m64 * stride_dom + do_off,
                     mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        if MASK_KIND != 0:
            mp = m_cols + m64 * stride_mm + m_off
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
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    n_n = tl.cdiv(Lk, BLOCK_N)
    pid = tl.program_id(0)
    off_bhk = tl.cast(pid // n_n, tl.int64)
    start_n = (pid % n_n) * BLOCK_N
    n64 = tl.cast(start_n, tl.int64)
    off_b = off_bhk // HKV
    off_hk = off_bhk % HKV
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_n = start_n + offs_n0
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    col_ok = offs_n < Lk

    k = tl.load(K + off_b * stride_kb + off_hk * stride_kh + n64 * stride_kn + offs_n0[:, None] * stride_kn
                + offs_d[None, :], mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    v = tl.load(V + off_b * stride_vb + off_hk * stride_vh + n64 * stride_vn + offs_n0[:, None] * stride_vn
                + offs_dv[None, :], mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
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
        m_cols = Msk + off_b * stride_mb + off_h * stride_mh + n64 * stride_mn
        lse_base = LSE + (off_b * H + off_h) * Lq
        delta_base = Delta + (off_b * H + off_h) * Lq
        if CAUSAL:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, m_cols, lse_base, delta_base, lo, mid,
                                     offs_n, offs_d, offs_dv, stride_qm, stride_dom, stride_mm, stride_mn,
                                     Lq, Lk, causal_off, qk_scale, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD,
                                     BLOCK_M, BLOCK_N, MASK_KIND, True, PRECISION, UPCAST)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, m_cols, lse_base, delta_base, mid, m_end,
                                 offs_n, offs_d, offs_dv, stride_qm, stride_dom, stride_mm, stride_mn,
                                 Lq, Lk, causal_off, qk_scale, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD,
                                 BLOCK_M, BLOCK_N, MASK_KIND, False, PRECISION, UPCAST)

    dk = dk * sm_scale
    tl.store(DK + off_b * stride_dkb + off_hk * stride_dkh + n64 * stride_dkn + offs_n0[:, None] * stride_dkn
             + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + off_b * stride_dvb + off_hk * stride_dvh + n64 * stride_dvn + offs_n0[:, None] * stride_dvn
             + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, m_rows, lo, hi, offs_m, offs_d, offs_dv,
                  kt_off, vt_off, m_off, stride_kn, stride_vn, stride_mn, Lq, Lk, causal_off, qk_scale,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr,
                  DV_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
                  APPLY_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Lq
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n64 = tl.cast(start_n, tl.int64)
        col_ok = offs_n < Lk
        kt = tl.load(k_base + n64 * stride_kn + kt_off,
                     mask=col_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        vt = tl.load(v_base + n64 * stride_vn + vt_off,
                     mask=col_ok[None, :] & (offs_dv[:, None] < HEAD_DIM_V), other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        if MASK_KIND != 0:
            mp = m_rows + n64 * stride_mn + m_off
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
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    n_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    off_bh = tl.cast(pid // n_m, tl.int64)
    start_m = pid % n_m
    if CAUSAL:
        start_m = n_m - 1 - start_m
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // G
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_m = start_m * BLOCK_M + offs_m0
    m64 = tl.cast(start_m * BLOCK_M, tl.int64)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    row_ok = offs_m < Lq

    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + m64 * stride_qm + offs_m0[:, None] * stride_qm
                + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + m64 * stride_dom + offs_m0[:, None] * stride_dom
                 + offs_dv[None, :], mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + off_bh * Lq + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + off_bh * Lq + offs_m, mask=row_ok, other=0.0)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    m_rows = Msk + off_b * stride_mb + off_h * stride_mh + m64 * stride_mm
    kt_off = offs_n0[None, :] * stride_kn + offs_d[:, None]
    vt_off = offs_n0[None, :] * stride_vn + offs_dv[:, None]
    m_off = offs_m0[:, None] * stride_mm + offs_n0[None, :] * stride_mn
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
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, m_rows, 0, full, offs_m, offs_d, offs_dv,
                       kt_off, vt_off, m_off, stride_kn, stride_vn, stride_mn, Lq, Lk, causal_off, qk_scale,
                       HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, BLOCK_N, MASK_KIND, False, PRECISION, UPCAST)
    if CAUSAL:
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, m_rows, full, hi, offs_m, offs_d, offs_dv,
                           kt_off, vt_off, m_off, stride_kn, stride_vn, stride_mn, Lq, Lk, causal_off, qk_scale,
                           HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, BLOCK_N, MASK_KIND, True, PRECISION, UPCAST)
    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + m64 * stride_dqm + offs_m0[:, None] * stride_dqm
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------------------------
# autotuning (CUDA only; the interpreter and single-candidate keys launch one config directly)
# ----------------------------------------------------------------------------------------------
TUNE_KEY = ["HEAD_DIM", "HEAD_DIM_V", "MASK_KIND", "CAUSAL", "Q_BUCKET", "K_BUCKET", "PRECISION"]


def _to_triton(c: KC.Cfg) -> triton.Config:
    return triton.Config(c.kwargs(), num_warps=c.num_warps, num_stages=c.num_stages)


def _pruner(kind: str):
    """Keep, in table order, the configs ``KC.candidates_for`` keeps for this key."""

    def prune(configs, named_args, **kwargs):
        a = {**named_args, **kwargs}
        want = KC.candidates_for(kind, a, KL.smem_limit(a["Q"].device))
        have = {KC.Cfg(c.kwargs.get("BLOCK_M"), c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c
                for c in configs}
        return [have[w] for w in want if w in have] or list(configs[:1])

    return prune


def autotuned(kernel, kind: str, key: list):
    return triton.autotune(configs=[_to_triton(c) for c in KC.all_configs(kind)], key=key,
                           cache_results=True, prune_configs_by={"early_config_prune": _pruner(kind)})(kernel)


AUTOTUNED = {} if interpreting() else {
    "fwd": autotuned(attn_fwd_kernel, "fwd", TUNE_KEY),
    "dkdv": autotuned(attn_bwd_dkdv_kernel, "dkdv", TUNE_KEY),
    "dq": autotuned(attn_bwd_dq_kernel, "dq", TUNE_KEY),
}
