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

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # an older Triton: every launch takes the pointer path (_common.use_tma says False)
    TensorDescriptor = None

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
def _row_tile(X, base, b, h, row0, offs_r, offs_c, stride_r, n_rows, N_COLS: tl.constexpr, ROWS: tl.constexpr,
              C_PAD: tl.constexpr, BOUNDS: tl.constexpr, TMA: tl.constexpr, UPCAST: tl.constexpr,
              TRANS: tl.constexpr = False):
    """The (ROWS, C_PAD) tile of rows ``row0..`` of one (batch, head) of Q, K or V (``TRANS``: its transpose,
    (C_PAD, ROWS)), zero past ``n_rows`` and past the ``N_COLS`` real columns. TMA: ``X`` is a rank-4 tensor
    descriptor (the copy engine zero-fills out-of-bounds rows and columns, no masks); else ``base`` points at
    the (batch, head) and ``offs_r`` are the tile's row numbers (``BOUNDS``: check them against ``n_rows``), and
    a transposed tile is loaded transposed (FMA and mma.sync dots would otherwise convert it in registers)."""
    if TMA:
        t = X.load([b, h, row0, 0]).reshape(ROWS, C_PAD)
        if TRANS:
            t = tl.trans(t)
    else:
        base = base + tl.cast(row0, tl.int64) * stride_r
        if TRANS:
            ptrs = base + offs_r[None, :] * stride_r + offs_c[:, None]
            ok = ((row0 + offs_r)[None, :] < n_rows) & (offs_c[:, None] < N_COLS)
        else:
            ptrs = base + offs_r[:, None] * stride_r + offs_c[None, :]
            ok = ((row0 + offs_r)[:, None] < n_rows) & (offs_c[None, :] < N_COLS)
        if BOUNDS:
            t = tl.load(ptrs, mask=ok, other=0.0)
        elif N_COLS != C_PAD:
            if TRANS:
                t = tl.load(ptrs, mask=offs_c[:, None] < N_COLS, other=0.0)
            else:
                t = tl.load(ptrs, mask=offs_c[None, :] < N_COLS, other=0.0)
        else:
            t = tl.load(ptrs)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _fwd_step(acc, l_i, m_i, q, K, V, k_base, v_base, m_rows, m_off, b, hk, start_n, q_pos, row_ok, offs_n0,
              offs_d, offs_dv, stride_kn, stride_vn, stride_mn, n_end, causal_off, qk_scale,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
              BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, APPLY_CAUSAL: tl.constexpr, BOUNDS: tl.constexpr,
              NEG_SCALE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    """One KV block of the online softmax (keys ``start_n..``): scores, running max and sum, ``acc += p @ v``.
    Row ``r`` is query position ``q_pos[r]``; the mask tile is at ``m_rows + start_n * stride_mn + m_off``;
    ``BOUNDS``: keys from ``n_end`` on are not attended (the ragged end of the sequence or of a split)."""
    kt = _row_tile(K, k_base, b, hk, start_n, offs_n0, offs_d, stride_kn, n_end, HEAD_DIM, BLOCK_N, D_PAD, BOUNDS,
                   TMA, UPCAST, True)
    qk = tl.dot(q, kt, input_precision=PRECISION)
    if MASK_KIND == 0 and not APPLY_CAUSAL and not BOUNDS and not NEG_SCALE:
        # every score is finite and the scale positive: the max of the scaled scores is the scaled max, and
        # each score costs one FMA (scale and subtract the max) instead of a multiply and a subtract
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(tl.fma(qk, qk_scale, -m_new[:, None]))
        alpha = tl.math.exp2(m_i - m_new)
    else:
        s = qk * qk_scale
        offs_n = start_n + offs_n0
        if MASK_KIND != 0:
            ok = row_ok[:, None]
            if BOUNDS:
                ok = ok & (offs_n[None, :] < n_end)
            s = _apply_mask(s, m_rows + tl.cast(start_n, tl.int64) * stride_mn + m_off, ok, MASK_KIND)
        if APPLY_CAUSAL:
            s = tl.where(offs_n[None, :] <= q_pos[:, None] + causal_off, s, NEG_INF)
        if BOUNDS:
            s = tl.where(offs_n[None, :] < n_end, s, NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)   # a row with nothing to attend yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _row_tile(V, v_base, b, hk, start_n, offs_n0, offs_dv, stride_vn, n_end, HEAD_DIM_V, BLOCK_N, DV_PAD,
                  BOUNDS, TMA, UPCAST)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, k_base, v_base, m_rows, m_off, b, hk, lo, hi, q_pos, row_ok, offs_d,
               offs_dv, stride_kn, stride_vn, stride_mn, n_end, causal_off, qk_scale,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr,
               DV_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
               APPLY_CAUSAL: tl.constexpr, BOUNDS: tl.constexpr, NEG_SCALE: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    """``_fwd_step`` over the KV blocks starting at ``lo, lo + BLOCK_N, .. < hi``."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, k_base, v_base, m_rows, m_off, b, hk, start_n, q_pos,
                                  row_ok, offs_n0, offs_d, offs_dv, stride_kn, stride_vn, stride_mn, n_end,
                                  causal_off, qk_scale, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, BLOCK_N, MASK_KIND,
                                  APPLY_CAUSAL, BOUNDS, NEG_SCALE, PRECISION, UPCAST, TMA)
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
                    NEG_SCALE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
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
    b32, h32, hk32 = off_b.to(tl.int32), off_h.to(tl.int32), off_hk.to(tl.int32)   # descriptor coordinates

    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_m = start_m * BLOCK_M + offs_m0
    m64 = tl.cast(start_m * BLOCK_M, tl.int64)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    row_ok = offs_m < Lq

    if TMA:   # Q, K, V, O are tensor descriptors: no pointers into them (these are never read)
        q_base = Msk
        k_base = Msk
        v_base = Msk
    else:
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        k_base = K + off_b * stride_kb + off_hk * stride_kh
        v_base = V + off_b * stride_vb + off_hk * stride_vh
    q = _row_tile(Q, q_base, b32, h32, start_m * BLOCK_M, offs_m0, offs_d, stride_qm, Lq, HEAD_DIM, BLOCK_M, D_PAD,
                  True, TMA, UPCAST)
    m_rows = Msk + off_b * stride_mb + off_h * stride_mh + m64 * stride_mm
    m_off = offs_m0[:, None] * stride_mm + offs_n0[None, :] * stride_mn

    m_i = tl.full([BLOCK_M], NEG_INF, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)

    # KV blocks in three passes, so that only the blocks that need a check pay for it: (1) blocks every row of
    # this query block sees completely, (2) causal: blocks on the diagonal inside Lk, (3) the ragged last block
    # (at most one), checked against Lk. Blocks past the diagonal are never visited.
    in_bounds = (Lk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(tl.maximum((start_m + 1) * BLOCK_M + causal_off, 0), Lk)
        full = tl.minimum(tl.maximum(start_m * BLOCK_M + causal_off + 1, 0), Lk)
        full = (full // BLOCK_N) * BLOCK_N
    else:
        hi = Lk
        full = in_bounds
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, k_base, v_base, m_rows, m_off, b32, hk32, 0, full, offs_m,
                               row_ok, offs_d, offs_dv, stride_kn, stride_vn, stride_mn, Lk, causal_off, qk_scale,
                               HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, BLOCK_N, MASK_KIND, False, False, NEG_SCALE,
                               PRECISION, UPCAST, TMA)
    tail = full
    if CAUSAL:
        tail = tl.minimum(tl.cdiv(hi, BLOCK_N) * BLOCK_N, in_bounds)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, k_base, v_base, m_rows, m_off, b32, hk32, full, tail,
                                   offs_m, row_ok, offs_d, offs_dv, stride_kn, stride_vn, stride_mn, Lk, causal_off,
                                   qk_scale, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, BLOCK_N, MASK_KIND, True, False,
                                   NEG_SCALE, PRECISION, UPCAST, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, k_base, v_base, m_rows, m_off, b32, hk32, tail, hi,
                               offs_m, row_ok, offs_d, offs_dv, stride_kn, stride_vn, stride_mn, Lk, causal_off,
                               qk_scale, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, BLOCK_N, MASK_KIND, CAUSAL, True,
                               NEG_SCALE, PRECISION, UPCAST, TMA)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + off_bh * Lq + offs_m, lse, mask=row_ok)
    if TMA:   # the copy engine drops rows past Lq and columns past the real head dim
        O.store([b32, h32, start_m * BLOCK_M, 0], acc.to(O.dtype).reshape(1, 1, BLOCK_M, DV_PAD))
    else:
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
def _bwd_dkdv_inner(dk, dv, k, v, Q, DO, Msk, LSE, Delta, off_b, off_hk, n64, first, per_head, total, offs_n,
                    offs_d, offs_dv, stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom,
                    stride_mb, stride_mh, stride_mm, stride_mn, H, G, Lq, Lk, causal_off, qk_scale,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr,
                    DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASK_KIND: tl.constexpr, APPLY_CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):
    """``total`` Q blocks: ``per_head`` blocks from row ``first`` for each query head of the KV group in turn.
    One flat loop over (head, block) rather than a loop over heads around a loop over blocks: the compiler
    pipelines one loop, and the nested form spilled registers once GQA made the head loop a runtime loop."""
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    col_ok = offs_n < Lk
    q_off = offs_m0[:, None] * stride_qm + offs_d[None, :]
    do_off = offs_m0[:, None] * stride_dom + offs_dv[None, :]
    m_off = offs_m0[None, :] * stride_mm + offs_n0[:, None] * stride_mn
    for it in range(0, total):
        g = it // per_head
        start_m = first + (it - g * per_head) * BLOCK_M
        off_h = off_hk * G + g
        offs_m = start_m + offs_m0
        m64 = tl.cast(start_m, tl.int64)
        row_ok = offs_m < Lq
        q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + m64 * stride_qm + q_off,
                    mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + m64 * stride_dom + do_off,
                     mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        row = (off_b * H + off_h) * Lq
        lse = tl.load(LSE + row + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + row + offs_m, mask=row_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        if MASK_KIND != 0:
            mp = Msk + off_b * stride_mb + off_h * stride_mh + n64 * stride_mn + m64 * stride_mm + m_off
            st = _apply_mask(st, mp, row_ok[None, :] & col_ok[:, None], MASK_KIND)
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

    # per query head: Q blocks [lo, mid) straddle the diagonal (causal compare), [mid, m_end) see this KV block
    # completely (blocks above the diagonal are skipped)
    m_end = tl.cdiv(Lq, BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = tl.maximum(start_n - causal_off, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        mid = tl.maximum(start_n + BLOCK_N - 1 - causal_off, 0)
        mid = tl.cdiv(mid, BLOCK_M) * BLOCK_M
        mid = tl.minimum(mid, m_end)
        lo = tl.minimum(lo, mid)
        n_diag = (mid - lo) // BLOCK_M
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, Msk, LSE, Delta, off_b, off_hk, n64, lo, n_diag, G * n_diag,
                                 offs_n, offs_d, offs_dv, stride_qb, stride_qh, stride_qm, stride_dob, stride_doh,
                                 stride_dom, stride_mb, stride_mh, stride_mm, stride_mn, H, G, Lq, Lk, causal_off,
                                 qk_scale, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, BLOCK_M, BLOCK_N, MASK_KIND, True,
                                 PRECISION, UPCAST)
    else:
        mid = 0
    n_full = (m_end - mid) // BLOCK_M
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, Msk, LSE, Delta, off_b, off_hk, n64, mid, n_full, G * n_full,
                             offs_n, offs_d, offs_dv, stride_qb, stride_qh, stride_qm, stride_dob, stride_doh,
                             stride_dom, stride_mb, stride_mh, stride_mm, stride_mn, H, G, Lq, Lk, causal_off,
                             qk_scale, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, BLOCK_M, BLOCK_N, MASK_KIND, False,
                             PRECISION, UPCAST)

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
# tensor descriptors and autotuning (CUDA only; the interpreter and single-candidate keys launch one config)
# ----------------------------------------------------------------------------------------------
TUNE_KEY = ["HEAD_DIM", "HEAD_DIM_V", "MASK_KIND", "CAUSAL", "Q_BUCKET", "K_BUCKET", "PRECISION"]
_new = object.__new__


def desc_maker(t, rows: int, cols: int):
    """A function making the rank-4 descriptor, box (1, 1, rows, cols), of a tensor laid out like ``t``. The
    layout is checked once, here (``TensorDescriptor`` validates on every construction, ~4 us): each call then
    costs a dict copy. Keeps no tensor."""
    fields = dict(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, cols]).__dict__)
    del fields["base"]

    def make(x):
        d = _new(TensorDescriptor)
        d.__dict__.update(fields)
        d.base = x
        return d
    return make


def _desc_hook(descs):
    """Config hook: size each descriptor's box rows for the config being run (the kernel's tile is the box)."""
    def hook(nargs):
        for name, rows in descs:
            d = nargs[name]
            d.block_shape = [1, 1, nargs[rows], d.block_shape[3]]   # a new list: descriptors share the template's
    return hook


def _to_triton(c: KC.Cfg, descs=None) -> triton.Config:
    return triton.Config(c.kwargs(), num_warps=c.num_warps, num_stages=c.num_stages,
                         pre_hook=_desc_hook(descs) if descs else None)


def _tensor(x):
    return getattr(x, "base", x)   # a descriptor's tensor


def _pruner(kind: str):
    """Keep, in table order, the configs ``KC.candidates_for`` keeps for this key."""

    def prune(configs, named_args, **kwargs):
        a = {**named_args, **kwargs}
        dev = next(_tensor(x).device for x in a.values() if hasattr(_tensor(x), "device"))
        want = KC.candidates_for(kind, a, KL.smem_limit(dev))
        have = {KC.Cfg(c.kwargs.get("BLOCK_M"), c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c
                for c in configs}
        return [have[w] for w in want if w in have] or list(configs[:1])

    return prune


def autotuned(kernel, kind: str, key: list, descs=None):
    """``kernel`` autotuned over every config of ``kind``; ``descs`` (``Launch.descs``): the variant taking
    tensor descriptors, whose boxes each config resizes (Triton keeps no disk cache of such timings: a config
    hook cannot be serialised)."""
    return triton.autotune(configs=[_to_triton(c, descs) for c in KC.all_configs(kind)], key=key,
                           cache_results=True, prune_configs_by={"early_config_prune": _pruner(kind)})(kernel)


AUTOTUNED = {} if interpreting() else {
    "fwd": autotuned(attn_fwd_kernel, "fwd", TUNE_KEY),
    "fwd_tma": autotuned(attn_fwd_kernel, "fwd", TUNE_KEY, KL.DESC_ROWS["fwd"]),
    "dkdv": autotuned(attn_bwd_dkdv_kernel, "dkdv", TUNE_KEY),
    "dq": autotuned(attn_bwd_dq_kernel, "dq", TUNE_KEY),
}
