"""Fused DMS training attention in Triton: forward with log-sum-exp, deterministic backward.

Same contract as ``core.dms_attention_reference`` (shape legend there)::

    q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv], log_keep [B, Hkv, T] fp32 or None,
    doc_start [B, T] int32 or None  ->  out [B, Hq, T, Dv]

For query i and key j (j <= i, same document): score = q_i . k_j * scale, plus ``log_keep[j]`` when
``i - j > window``. ``log_keep`` is the already shifted per-key bias (``core.shift.shifted_log_keep``;
the shift and its gradient stay in torch). Documents must be contiguous runs (packed sequences):
``doc_start[b, i]`` is the first position of position i's document, so "same document" is
``j >= doc_start[i]`` and each query block only visits the key blocks of its documents.

Kernels (one program per (block, head)):

- forward: online softmax over key blocks; blocks entirely older than the window take the bias
  unconditionally, only the blocks near the diagonal evaluate the window/causal/document masks.
  Stores the base-2 log-sum-exp per query for the backward.
- backward dK / dV / d(log_keep): one program per (key block, query head) over the query blocks that
  can see its keys; with GQA each query head writes its own fp32 share and the group's shares are then
  summed in a fixed order (one more launch for dK, dV and d(log_keep)): no atomics, bitwise
  reproducible, and G times more programs than one per KV head (5/1 heads at TP=8 left most of an H100's
  SMs idle).
- backward dQ: one program per (query block, query head) over its key blocks; it runs first and also
  stores its rows' ``delta = rowsum(dO * O)``, which the dK / dV kernel reads.

A forward + backward is 4 launches with GQA (3 without): the host's cost of issuing them bounds short
sequences at small head counts (docs/benchmarks.md, "host-bound" rows).

Query-block programs start with the last block (the one with the most key blocks), so the longest
programs run first and the short ones fill the tail.

Inputs in bf16 / fp16 (or fp32), accumulation in fp32. Head dims: powers of two from 16 to 256.
``TRITON_INTERPRET=1`` runs the kernels on CPU tensors (slowly): the unit tests check them that way.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dms_megatron.core.shift import check_doc_ids
from dms_megatron.kernels.triton_device import require_triton_device

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@triton.jit
def _masked_scores(q, k, bias, q_doc, offs_m, offs_n, col_ok, window, qk_scale, HAS_BIAS: tl.constexpr,
                   HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """Base-2 scores of a block near the diagonal: causal, the bias only beyond the window, other
    documents and columns past T at -inf."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    age = offs_m[:, None] - offs_n[None, :]
    if HAS_BIAS:
        s += tl.where(age > window, bias[None, :], 0.0)
    ok = (age >= 0) & col_ok[None, :]
    if HAS_DOCS:
        ok = ok & (offs_n[None, :] >= q_doc[:, None])
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _tma_rows(desc, b, h, start, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """Rows ``start..start + ROWS`` of head (b, h) through a [B, H, T, WIDTH] tensor descriptor (TMA on
    Hopper); rows past T come back as zeros."""
    return tl.reshape(desc.load([b, h, start, 0]), [ROWS, WIDTH])


@triton.jit
def _kv_rows(desc, base, b, h, start, offs, stride, ok, ROWS: tl.constexpr, WIDTH: tl.constexpr,
             TMA: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """A key or value tile ``[ROWS, WIDTH]`` at rows ``offs`` (from ``start``): through the descriptor with
    TMA, else by pointer from ``base`` (rows with ``ok`` false as zeros when ``MASKED``)."""
    if TMA:
        rows = _tma_rows(desc, b, h, start, ROWS, WIDTH)
    elif MASKED:
        rows = tl.load(
            base + offs[:, None] * stride + tl.arange(0, WIDTH)[None, :], mask=ok[:, None], other=0.0
        )
    else:
        rows = tl.load(base + offs[:, None] * stride + tl.arange(0, WIDTH)[None, :])
    return rows


@triton.jit
def _softmax_step(s, m_i, l_i, acc, v, PRECISION: tl.constexpr):
    """One key block of the online softmax: running max, normaliser and output accumulator."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return (
        m_new,
        l_i * alpha + tl.sum(p, axis=1),
        acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION),
    )


@triton.jit
def _key_range(q_first, offs_m, row_ok, DS, b, sdb, T, window, HAS_BIAS: tl.constexpr, HAS_DOCS: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    """Key blocks a query block visits: from ``lo`` (its earliest document start) to ``hi`` (the
    diagonal); below ``full_end`` every key is older than the window (without bias: strictly in the
    past) for every query of the block, so those blocks need no causal or window mask. Also each
    query's document start (``q_doc``; the positions themselves without documents, unused then)."""
    lo = 0
    q_doc = offs_m
    if HAS_DOCS:
        q_doc = tl.load(DS + b * sdb + offs_m, mask=row_ok, other=T)
        lo = (tl.min(q_doc, axis=0) // BN) * BN
    hi = tl.minimum(q_first + BM, T)
    full_end = q_first - window if HAS_BIAS else q_first
    full_end = tl.maximum((tl.maximum(full_end, 0) // BN) * BN, lo)
    return q_doc, lo, full_end, hi


@triton.jit
def _query_tile(Q, K, V, LK, sqb, sqh, sqt, skb, skh, svb, svh, slb, slh, T, HQ: tl.constexpr,
                G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr):  # fmt: skip
    """Program (query block, batch x head): its rows, their query tile, and the bases of its KV head's
    keys, values and log-keep bias."""
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // G
    q_first = (tl.num_programs(0) - 1 - tl.program_id(0)) * BM  # the longest (last) query block first
    offs_m = q_first + tl.arange(0, BM)
    row_ok = offs_m < T
    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqt + tl.arange(0, D)[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    return (
        pid_bh,
        b,
        h,
        q_first,
        offs_m,
        row_ok,
        q,
        K + b * skb + hk * skh,
        V + b * svb + hk * svh,
        LK + b * slb + hk * slh,
    )


@triton.jit
def _fwd_kernel(
    Q, K, V, LK, DS, Out, LSE, KD, VD,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, slb, slh, sdb,
    T, window, qk_scale,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DOCS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PRECISION: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """One query block's output and log-sum-exp; with TMA the key and value tiles come through the
    descriptors KD / VD."""
    pid_bh, b, h, q_first, offs_m, row_ok, q, k_base, v_base, lk_base = _query_tile(
        Q, K, V, LK, sqb, sqh, sqt, skb, skh, svb, svh, slb, slh, T, HQ, G, D, BM
    )
    offs_n0 = tl.arange(0, BN)
    offs_dv = tl.arange(0, DV)
    q_doc, lo, full_end, hi = _key_range(
        q_first, offs_m, row_ok, DS, b, sdb, T, window, HAS_BIAS, HAS_DOCS, BM, BN
    )

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DV], tl.float32)
    hk = h // G
    for start in range(lo, full_end, BN):
        offs_n = start + offs_n0
        k = _kv_rows(KD, k_base, b, hk, start, offs_n, skt, offs_n, BN, D, TMA, False)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            s += tl.load(lk_base + offs_n)[None, :] * 1.4426950408889634
        if HAS_DOCS:
            s = tl.where(offs_n[None, :] >= q_doc[:, None], s, float("-inf"))
        v = _kv_rows(VD, v_base, b, hk, start, offs_n, svt, offs_n, BN, DV, TMA, False)
        m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, v, PRECISION)
    for start in range(full_end, hi, BN):
        offs_n = start + offs_n0
        col_ok = offs_n < T
        k = _kv_rows(KD, k_base, b, hk, start, offs_n, skt, col_ok, BN, D, TMA, True)
        bias = tl.zeros([BN], tl.float32)
        if HAS_BIAS:
            bias = tl.load(lk_base + offs_n, mask=col_ok, other=0.0) * 1.4426950408889634
        s = _masked_scores(
            q, k, bias, q_doc, offs_m, offs_n, col_ok, window, qk_scale, HAS_BIAS, HAS_DOCS, PRECISION
        )
        v = _kv_rows(VD, v_base, b, hk, start, offs_n, svt, col_ok, BN, DV, TMA, True)
        m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, v, PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(
        Out + b * sob + h * soh + offs_m[:, None] * sot + offs_dv[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(LSE + pid_bh * T + offs_m, m_i + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, LK, DS, DE, DO, LSE, DELTA, DK, DV_, DLK, QD, DOD,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, slb, slh, sdb,
    T, window, qk_scale, scale,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DOCS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PRECISION: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """One key block's dK / dV / d(log_keep) share from one query head, stored at row (b, h) of
    [B, HQ, T, ...] (the outputs themselves when G == 1); with TMA the query and output-gradient tiles
    come through the descriptors QD / DOD."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // G
    k_first = pid_n * BN
    offs_n = k_first + tl.arange(0, BN)
    offs_m0 = tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    col_ok = offs_n < T
    k_ptrs = K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :]
    v_ptrs = V + b * svb + hk * svh + offs_n[:, None] * svt + offs_dv[None, :]
    k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
    v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
    bias = tl.zeros([BN], tl.float32)
    if HAS_BIAS:
        bias = tl.load(LK + b * slb + hk * slh + offs_n, mask=col_ok, other=0.0) * 1.4426950408889634
    q_hi = T
    if HAS_DOCS:  # queries of the last key's document end there; later keys of the block end earlier or equal
        q_hi = tl.load(DE + b * sdb + tl.minimum(k_first + BN, T) - 1)
    # query blocks starting at `mask_end` or later are older-than-window (or strictly later) for every key
    mask_end = k_first + tl.cdiv(BN + window, BM) * BM if HAS_BIAS else k_first + tl.cdiv(BN, BM) * BM
    mask_end = tl.minimum(mask_end, q_hi)

    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, DV], tl.float32)
    dlk = tl.zeros([BN], tl.float32)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sob + h * soh
    row_base = pid_bh * T
    # transposed tiles (keys down, queries across): every product takes a loaded tile or the
    # accumulator-shaped result directly (no register transpose), the bias gradient is a row sum
    for start in range(k_first, mask_end, BM):
        offs_m = start + offs_m0
        row_ok = offs_m < T
        if TMA:
            qT = tl.trans(_tma_rows(QD, b, h, start, BM, D))
            do = _tma_rows(DOD, b, h, start, BM, DV)
        else:
            qT = tl.load(q_base + offs_m[None, :] * sqt + offs_d[:, None], mask=row_ok[None, :], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sot + offs_dv[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
        sT = tl.dot(k, qT, input_precision=PRECISION) * qk_scale
        age = offs_m[None, :] - offs_n[:, None]
        outside = age > window
        if HAS_BIAS:
            sT += tl.where(outside, bias[:, None], 0.0)
        ok = (age >= 0) & col_ok[:, None]
        if HAS_DOCS:
            q_doc = tl.load(DS + b * sdb + offs_m, mask=row_ok, other=T)
            ok = ok & (offs_n[:, None] >= q_doc[None, :])
        pT = tl.where(ok, tl.exp2(sT - lse[None, :]), 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION)
        if HAS_BIAS:
            dlk += tl.sum(tl.where(outside, dsT, 0.0), axis=1)
    for start in range(mask_end, q_hi, BM):
        offs_m = start + offs_m0
        row_ok = offs_m < q_hi
        if TMA:  # rows past q_hi (another document) load as they are: their lse of +inf zeroes them
            qT = tl.trans(_tma_rows(QD, b, h, start, BM, D))
            do = _tma_rows(DOD, b, h, start, BM, DV)
        else:
            qT = tl.load(q_base + offs_m[None, :] * sqt + offs_d[:, None], mask=row_ok[None, :], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sot + offs_dv[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
        sT = tl.dot(k, qT, input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            sT += bias[:, None]
        pT = tl.exp2(sT - lse[None, :])
        if HAS_DOCS:
            q_doc = tl.load(DS + b * sdb + offs_m, mask=row_ok, other=T)
            pT = tl.where(offs_n[:, None] >= q_doc[None, :], pT, 0.0)
        pT = tl.where(col_ok[:, None], pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION)
        if HAS_BIAS:
            dlk += tl.sum(dsT, axis=1)
    rows = (row_base + offs_n)[:, None]
    tl.store(DK + rows * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV_ + rows * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty), mask=col_ok[:, None])
    if HAS_BIAS:
        tl.store(DLK + row_base + offs_n, dlk, mask=col_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, LK, DS, DO, LSE, DELTA, DQ, KD, VD, Out,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, slb, slh, sdb, s_ob, s_oh, s_ot,
    T, window, qk_scale, scale,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DOCS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PRECISION: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """One query block's dQ, and its rows' ``delta = rowsum(dO * O)`` in fp32 (stored for the dK / dV
    kernel, which runs after this one); with TMA the key and value tiles come through the descriptors
    KD / VD."""
    pid_bh, b, h, q_first, offs_m, row_ok, q, k_base, v_base, lk_base = _query_tile(
        Q, K, V, LK, sqb, sqh, sqt, skb, skh, svb, svh, slb, slh, T, HQ, G, D, BM
    )
    offs_n0 = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    do_ptrs = DO + b * sob + h * soh + offs_m[:, None] * sot + offs_dv[None, :]
    do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh * T + offs_m, mask=row_ok, other=float("inf"))
    o = tl.load(
        Out + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_dv[None, :], mask=row_ok[:, None], other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh * T + offs_m, delta, mask=row_ok)
    q_doc, lo, full_end, hi = _key_range(
        q_first, offs_m, row_ok, DS, b, sdb, T, window, HAS_BIAS, HAS_DOCS, BM, BN
    )

    dq = tl.zeros([BM, D], tl.float32)
    hk = h // G
    for start in range(lo, full_end, BN):
        offs_n = start + offs_n0
        k = _kv_rows(KD, k_base, b, hk, start, offs_n, skt, offs_n, BN, D, TMA, False)
        v = _kv_rows(VD, v_base, b, hk, start, offs_n, svt, offs_n, BN, DV, TMA, False)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            s += tl.load(lk_base + offs_n)[None, :] * 1.4426950408889634
        p = tl.exp2(s - lse[:, None])
        if HAS_DOCS:
            p = tl.where(offs_n[None, :] >= q_doc[:, None], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    for start in range(full_end, hi, BN):
        offs_n = start + offs_n0
        col_ok = offs_n < T
        k = _kv_rows(KD, k_base, b, hk, start, offs_n, skt, col_ok, BN, D, TMA, True)
        v = _kv_rows(VD, v_base, b, hk, start, offs_n, svt, col_ok, BN, DV, TMA, True)
        bias = tl.zeros([BN], tl.float32)
        if HAS_BIAS:
            bias = tl.load(lk_base + offs_n, mask=col_ok, other=0.0) * 1.4426950408889634
        s = _masked_scores(
            q, k, bias, q_doc, offs_m, offs_n, col_ok, window, qk_scale, HAS_BIAS, HAS_DOCS, PRECISION
        )
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(
        DQ + pid_bh * T * D + offs_m[:, None] * D + offs_d[None, :],
        (dq * scale).to(DQ.dtype.element_ty),
        mask=row_ok[:, None],
    )


@triton.jit
def _group_sum_rows(SRC, DST, N, kv, offs, G: tl.constexpr, BLOCK: tl.constexpr):
    ok = offs < N
    acc = tl.zeros([BLOCK], tl.float32)
    for g in tl.static_range(G):
        acc += tl.load(SRC + (kv * G + g) * N + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(DST + kv * N + offs, acc.to(DST.dtype.element_ty), mask=ok)


@triton.jit
def _group_sum_kernel(SRC_A, DST_A, N_A, SRC_B, DST_B, N_B, SRC_C, DST_C, N_C, G: tl.constexpr,
                      COUNT: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """dst[kv, :] = sum over the group's g of src[kv * G + g, :] (fp32, in order g = 0..G-1), cast to
    dst's dtype, for COUNT (1-3) tensors of rows of N_A, N_B, N_C contiguous elements (dK, dV and
    d(log_keep) in one launch)."""
    kv = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _group_sum_rows(SRC_A, DST_A, N_A, kv, offs, G, BLOCK)
    if COUNT > 1:
        _group_sum_rows(SRC_B, DST_B, N_B, kv, offs, G, BLOCK)
    if COUNT > 2:
        _group_sum_rows(SRC_C, DST_C, N_C, kv, offs, G, BLOCK)


def _group_sum(G: int, *shares: tuple[torch.Tensor, torch.dtype]) -> list[torch.Tensor]:
    """Sum each GQA group's per-query-head shares ``[B, Hkv * G, ...]`` -> ``[B, Hkv, ...]`` in the given
    dtypes, for one to three ``(shares, dtype)`` pairs in one launch."""
    B, HQ = shares[0][0].shape[:2]
    outs = [x.new_empty((B, HQ // G, *x.shape[2:]), dtype=dtype) for x, dtype in shares]
    sizes = [math.prod(x.shape[2:]) for x, _ in shares]
    args = []
    for i in range(3):
        j = min(i, len(shares) - 1)  # unused slots repeat the last tensor (never read: COUNT)
        args += [shares[j][0], outs[j], sizes[j]]
    block = 1024
    _group_sum_kernel[(_cdiv(max(sizes), block), B * (HQ // G))](*args, G=G, COUNT=len(shares), BLOCK=block)
    return outs


# Launch settings per kernel ("fwd", "dkdv", "dq"): "blocks" (query block, key block) and Triton's
# num_warps / num_stages; optional "tma" (streamed tiles loaded through tensor descriptors; Triton 3.6's
# automatic warp specialisation of the main loops did not compile on an H100, 2026-12-08). The CUDA
# defaults are the fastest of benchmarks/attention_tune.py's sweep on an H100 (2026-12-07;
# docs/results/2026-12-07_h100_tuned_step): for D = 128 the same three settings won (or were within 1.5%
# of the winner) at 5/1, 4/1 and 32/8 heads, T = 8K and 32K, and cut fwd+bwd by 28-31% against the
# earlier 128x64 / 64x64 / 128x32 tiles at Triton's default warps. dK/dV stays off the 32 x 128 and
# 16 x 128 tiles at 4 warps: those gave dK 0.11-0.15 off the reference for one bf16 case (T=777, D=64,
# documents) on an H100 on 2026-12-05.
_CUDA_LAUNCH = {
    64: {
        "fwd": {"blocks": (64, 64), "num_warps": 4, "num_stages": 3},
        "dkdv": {"blocks": (64, 64), "num_warps": 4, "num_stages": 3},
        "dq": {"blocks": (64, 64), "num_warps": 4, "num_stages": 2},
    },
    128: {
        "fwd": {"blocks": (128, 128), "num_warps": 8, "num_stages": 3},
        "dkdv": {"blocks": (64, 128), "num_warps": 8, "num_stages": 3},
        "dq": {"blocks": (64, 64), "num_warps": 4, "num_stages": 2},
    },
    # larger heads: small tiles (shared memory), Triton's default warps and stages
    256: {
        "fwd": {"blocks": (64, 32)},
        "dkdv": {"blocks": (32, 64)},
        "dq": {"blocks": (64, 32)},
    },
}
# fp32 inputs (tests, oracles; speed does not matter) multiply in IEEE fp32 without tensor cores, which
# takes far more registers per tile: compiled for sm_90 on CPU (benchmarks/kernel_resources.py,
# 2026-12-08), the earlier fp32 tiles (forward 128 x 64, dK/dV 64 x 64, dQ 128 x 32; 3 stages) needed
# 213-230 KB of shared memory and ran at 32 registers with 21-25 KB of spill stack per thread, and any
# 64-wide tile at 4 warps fell into the same mode (7-18 KB): the likely cause of the fp32 GPU tests that
# failed or stalled on H100s (2026-12-07 / 08). At 32 x 32 tiles, 4 warps, 2 stages: 255 registers,
# <= 1.2 KB of stack, <= 70 KB of shared memory.
_FP32_LAUNCH = {
    kernel: {"blocks": (32, 32), "num_warps": 4, "num_stages": 2} for kernel in ("fwd", "dkdv", "dq")
}
_INTERPRETED_LAUNCH = {kernel: {"blocks": (16, 16)} for kernel in ("fwd", "dkdv", "dq")}
# Diagnostics and tuning only (benchmarks/attention_tune.py, step_throughput --triton-launch): per kernel,
# settings that replace the defaults above.
LAUNCH_OVERRIDES: dict[str, dict] = {}


def _launch(d: int, dv: int, interpret: bool, fp32: bool = False) -> dict[str, dict]:
    """Launch settings of each kernel: the forward, dK/dV (a key block visits query blocks) and dQ (a
    query block visits key blocks), for head dims ``d`` (queries, keys) and ``dv`` (values) and 16-bit
    (default) or fp32 inputs."""
    width = max(d, dv)
    if interpret:
        settings = _INTERPRETED_LAUNCH
    elif width > 128:
        settings = _CUDA_LAUNCH[256]
    elif fp32:
        settings = _FP32_LAUNCH
    else:
        settings = _CUDA_LAUNCH[64 if width <= 64 else 128]
    return {kernel: settings[kernel] | LAUNCH_OVERRIDES.get(kernel, {}) for kernel in settings}


def _split(setting: dict) -> tuple[int, int, dict]:
    """One kernel's setting (see ``_launch``) -> query block, key block, Triton's launch options."""
    bm, bn = setting["blocks"]
    return bm, bn, {k: v for k, v in setting.items() if k not in ("blocks", "tma")}


def _descriptors(setting: dict, rows: int, *tensors: torch.Tensor) -> tuple:
    """With ``"tma": True`` in a kernel's setting: ``[B, H, T, W]`` tensor descriptors of blocks of ``rows``
    rows for ``tensors`` (their tiles then load through TMA on Hopper), else (or where TMA cannot
    address one of them: 16-byte alignment of the base and strides) ``None`` for each."""
    none = (None,) * len(tensors)
    if not setting.get("tma"):
        return none
    from triton.tools.tensor_descriptor import TensorDescriptor

    descs = []
    for x in tensors:
        size = x.element_size()
        if x.data_ptr() % 16 or any(stride * size % 16 for stride in x.stride()[:-1]):
            return none
        descs.append(TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, x.shape[-1]]))
    return tuple(descs)


def _precision(q: torch.Tensor) -> str:
    """fp32 inputs multiply in full fp32 ("ieee"); Triton's default for them, TF32, was ~1e-3 off the
    float64 reference on an H200. 16-bit inputs ignore it."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride()[:3]


# per device: stand-ins for an absent bias / document bound (their kernels never dereference them)
_placeholders: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _launch_args(q, k, v, log_keep, doc_start):
    if q.device not in _placeholders:
        _placeholders[q.device] = (q.new_empty(1, dtype=torch.float32), q.new_empty(1, dtype=torch.int32))
    lk = log_keep if log_keep is not None else _placeholders[q.device][0]
    ds = doc_start if doc_start is not None else _placeholders[q.device][1]
    strides = (
        *_strides(q),
        *_strides(k),
        *_strides(v),
    )
    lk_strides = lk.stride()[:2] if log_keep is not None else (0, 0)
    ds_stride = ds.stride(0) if doc_start is not None else 0
    return lk, ds, strides, lk_strides, ds_stride


class _DMSAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_keep, doc_start, doc_end, window, scale):
        B, HQ, T, D = q.shape
        HKV, DV = k.shape[1], v.shape[-1]
        G = HQ // HKV
        interpret = not q.is_cuda
        setting = _launch(D, DV, interpret, q.dtype == torch.float32)["fwd"]
        BM, BN, options = _split(setting)
        out = torch.empty(B, HQ, T, DV, dtype=q.dtype, device=q.device)
        lse = torch.empty(B * HQ, T, dtype=torch.float32, device=q.device)
        lk, ds, strides, lk_strides, ds_stride = _launch_args(q, k, v, log_keep, doc_start)
        kd, vd = _descriptors(setting, BN, k, v)
        _fwd_kernel[(_cdiv(T, BM), B * HQ)](
            q, k, v, lk, ds, out, lse, kd, vd, *strides, *_strides(out), *lk_strides, ds_stride,
            T, window, scale * LOG2E,
            HQ=HQ, G=G, D=D, DV=DV, HAS_BIAS=log_keep is not None, HAS_DOCS=doc_start is not None,
            PRECISION=_precision(q),
            BM=BM, BN=BN, TMA=kd is not None, **options,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, log_keep, doc_start, doc_end, out, lse)
        ctx.window, ctx.scale = window, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, log_keep, doc_start, doc_end, out, lse = ctx.saved_tensors
        window, scale = ctx.window, ctx.scale
        B, HQ, T, D = q.shape
        HKV, DV = k.shape[1], v.shape[-1]
        G = HQ // HKV
        interpret = not q.is_cuda
        launch = _launch(D, DV, interpret, q.dtype == torch.float32)
        dout = _last_dim_contiguous(dout)
        delta = torch.empty(B * HQ, T, dtype=torch.float32, device=q.device)
        lk, ds, strides, lk_strides, ds_stride = _launch_args(q, k, v, log_keep, doc_start)
        de = doc_end if doc_end is not None else ds
        flags = dict(
            D=D, DV=DV, HAS_BIAS=log_keep is not None, HAS_DOCS=doc_start is not None, PRECISION=_precision(q)
        )
        # dQ first: it also computes delta = rowsum(dO * O), which the dK / dV kernel reads
        dq = torch.empty(B, HQ, T, D, dtype=q.dtype, device=q.device)
        BM, BN, options = _split(launch["dq"])
        kd, vd = _descriptors(launch["dq"], BN, k, v)
        _bwd_dq_kernel[(_cdiv(T, BM), B * HQ)](
            q, k, v, lk, ds, dout, lse, delta, dq, kd, vd, out,
            *strides, *_strides(dout), *lk_strides, ds_stride, *_strides(out),
            T, window, scale * LOG2E, scale,
            HQ=HQ, G=G, BM=BM, BN=BN, TMA=kd is not None, **flags, **options,
        )  # fmt: skip
        # one share per query head (fp32 when a GQA group's shares are summed after the kernel)
        share = torch.float32 if G > 1 else None
        dk = torch.empty(B, HQ, T, D, dtype=share or k.dtype, device=k.device)
        dv = torch.empty(B, HQ, T, DV, dtype=share or v.dtype, device=v.device)
        dlk = torch.empty(B, HQ, T, dtype=torch.float32, device=q.device) if log_keep is not None else lk
        BM, BN, options = _split(launch["dkdv"])
        qd, dod = _descriptors(launch["dkdv"], BM, q, dout)
        _bwd_dkdv_kernel[(_cdiv(T, BN), B * HQ)](
            q, k, v, lk, ds, de, dout, lse, delta, dk, dv, dlk, qd, dod,
            *strides, *_strides(dout), *lk_strides, ds_stride,
            T, window, scale * LOG2E, scale,
            HQ=HQ, G=G, BM=BM, BN=BN, TMA=qd is not None, **flags, **options,
        )  # fmt: skip
        if G > 1:  # the group's shares, summed in a fixed order (dK, dV and d(log_keep) in one launch)
            pairs = [(dk, k.dtype), (dv, v.dtype)] + ([(dlk, torch.float32)] if log_keep is not None else [])
            dk, dv, *rest = _group_sum(G, *pairs)
            dlk = rest[0] if rest else dlk
        return dq, dk, dv, (dlk if log_keep is not None else None), None, None, None, None


def document_bounds(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(doc_start, doc_end)`` int32 ``[B, T]`` from per-position document ids ``[B, T]``: the first
    position of each position's document, and one past its last. Documents must be contiguous runs
    (as packed sequences are); an id that comes back after another is a ``ValueError``."""
    B, T = doc_ids.shape
    pos = torch.arange(T, device=doc_ids.device).expand(B, T)
    new = torch.ones(B, T, dtype=torch.bool, device=doc_ids.device)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    if not _capturing():  # the check reads the ids on the host; a CUDA-graph capture cannot
        runs = new.sum(dim=1)
        distinct = torch.tensor([row.unique().numel() for row in doc_ids], device=doc_ids.device)
        if bool((runs != distinct).any()):
            raise ValueError(
                "the triton backend needs each document to be one contiguous run of positions (packed "
                "sequences); these doc_ids reuse an id after another document"
            )
    start = torch.where(new, pos, torch.zeros_like(pos)).cummax(dim=1).values
    last = torch.ones(B, T, dtype=torch.bool, device=doc_ids.device)
    last[:, :-1] = new[:, 1:]
    end = torch.where(last, pos + 1, torch.full_like(pos, T)).flip(1).cummin(dim=1).values.flip(1)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# The layers of one micro-batch share one doc_ids tensor: compute (and check) its bounds once, not once
# per layer. Holding the tensor keeps its id valid. A CUDA-graph capture (megatron/teacher_graph.py)
# refills the same static doc_ids between replays, so an entry made outside a capture is not used inside
# one (nor the reverse): the capture computes the bounds in the graph, once for all its layers.
_bounds_cache: list = [None, None, None, None]  # [doc_ids tensor, B, capturing, (doc_start, doc_end)]


def _cached_document_bounds(doc_ids: torch.Tensor, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    capturing = _capturing()
    if _bounds_cache[0] is doc_ids and _bounds_cache[1] == B and _bounds_cache[2] == capturing:
        return _bounds_cache[3]
    bounds = document_bounds(check_doc_ids(doc_ids, B, T))
    _bounds_cache[:] = [doc_ids, B, capturing, bounds]
    return bounds


def supported(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether these shapes and dtypes run on the Triton kernel (else the dispatcher uses FlexAttention)."""
    return (
        q.shape[-1] in SUPPORTED_HEAD_DIMS
        and v.shape[-1] in SUPPORTED_HEAD_DIMS
        and q.dtype in (torch.bfloat16, torch.float16, torch.float32)
    )


def dms_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_keep: torch.Tensor | None,
    window: int,
    scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused DMS attention (see the module docstring); ``log_keep`` is the shifted bias [B, Hkv, T]."""
    B, _, T, D = q.shape
    if not supported(q, v):
        raise ValueError(
            f"the triton backend takes head dims {SUPPORTED_HEAD_DIMS} and bf16/fp16/fp32, got "
            f"D={D}, Dv={v.shape[-1]}, {q.dtype}"
        )
    require_triton_device(q, "the triton backend", "; use attention_backend='reference' on CPU")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    if log_keep is not None:
        log_keep = log_keep.float().contiguous()
    doc_start = doc_end = None
    if doc_ids is not None:
        doc_start, doc_end = _cached_document_bounds(doc_ids.to(q.device), B, T)
    return _DMSAttentionTriton.apply(q, k, v, log_keep, doc_start, doc_end, int(window), scale)
