"""Triton decode attention: one split-K kernel (``decode_split_kernel``) over each stream's pages and,
fused, its window ring, and one kernel that merges the splits. ``paged_decode``'s ``triton`` backend
runs the same split kernel without the ring (its own merge returns the log-sum-exp too);
``ring_paged_decode_attention`` is DMS decode attention in two launches.

A stream (one sequence, one KV head) holds its recent tokens in a dense ring of ``W`` slots and its
older kept tokens in pages (``kernels.paged_decode``). The unfused path runs the paged kernel, then
separate torch operations for merging its splits, attending over the ring and merging the two; here the
ring is one more split of the paged kernel (its slots ``0 .. ring_len - 1`` are all visible: delayed
eviction keeps every ring token visible to the next query) and the merge of all splits by log-sum-exp
is a second kernel.

Contract: q [S, g, D]; k_pool / v_pool [num_blocks, block_size, D(v)]; block_table [S, max_blocks];
lengths [S] (paged tokens); ring_k / ring_v [S, W, D(v)]; ring_lengths [S] (valid ring slots, a prefix)
-> out [S, g, Dv] fp32, softmax over pages and ring together (0 for a stream with neither).

CUDA, or CPU under ``TRITON_INTERPRET=1`` (tests). ``tests/unit/test_fused_decode.py`` holds it equal to
the unfused reference composition.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dms_megatron.kernels.paged_decode import TOKENS_PER_TILE, _int32, _sm_count, decode_head_dims_ok
from dms_megatron.kernels.triton_device import require_triton_device


@triton.jit
def _tile_step(q, k, v, live, m_i, l_i, acc, scale, PRECISION: tl.constexpr):
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
    scores = tl.where(live[None, :], scores, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    p = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _attend_pages(q, K, V, TABLE, s, lo, hi, table_stride, m_i, l_i, acc, scale, dims, dvs,
                  BLOCK_SIZE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, TILE: tl.constexpr,
                  PRECISION: tl.constexpr):  # fmt: skip
    """Online softmax over the stream's paged tokens ``lo .. hi - 1`` (slots through its block table)."""
    for start in range(lo, hi, TILE):
        tok = start + tl.arange(0, TILE)
        live = tok < hi
        block = tl.load(TABLE + s * table_stride + tok // BLOCK_SIZE, mask=live, other=0).to(tl.int64)
        slot = block * BLOCK_SIZE + tok % BLOCK_SIZE
        k = tl.load(K + slot[:, None] * D + dims[None, :], mask=live[:, None], other=0.0)
        v = tl.load(V + slot[:, None] * DV + dvs[None, :], mask=live[:, None], other=0.0)
        m_i, l_i, acc = _tile_step(q, k, v, live, m_i, l_i, acc, scale, PRECISION)
    return m_i, l_i, acc


@triton.jit
def decode_split_kernel(
    Q, K, V, TABLE, LENS, RK, RV, RLENS, ACC, M, L,
    scale, tokens_per_split, table_stride, G, W,
    BLOCK_SIZE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_G: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr, HAS_RING: tl.constexpr,
):  # fmt: skip
    """Program (stream, split): a share of the stream's pages, or (``HAS_RING``, the last split) its
    window ring; writes the split's running max, normaliser and unnormalised output."""
    s = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, D)
    dvs = tl.arange(0, DV)
    q = tl.load(Q + (s * G + rows[:, None]) * D + dims[None, :], mask=rows[:, None] < G, other=0.0)
    m_i = tl.full([BLOCK_G], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, DV], tl.float32)
    page_splits = n_splits - 1 if HAS_RING else n_splits
    if split < page_splits:  # a share of the pages
        lo = split * tokens_per_split
        hi = tl.minimum(lo + tokens_per_split, tl.load(LENS + s))
        m_i, l_i, acc = _attend_pages(q, K, V, TABLE, s, lo, hi, table_stride, m_i, l_i, acc, scale,
                                      dims, dvs, BLOCK_SIZE, D, DV, TILE, PRECISION)  # fmt: skip
    else:  # the window ring: a dense prefix of W slots
        ring_len = tl.load(RLENS + s)
        for start in range(0, ring_len, TILE):
            tok = start + tl.arange(0, TILE)
            live = tok < ring_len
            k = tl.load(RK + (s * W + tok[:, None]) * D + dims[None, :], mask=live[:, None], other=0.0)
            v = tl.load(RV + (s * W + tok[:, None]) * DV + dvs[None, :], mask=live[:, None], other=0.0)
            m_i, l_i, acc = _tile_step(q, k, v, live, m_i, l_i, acc, scale, PRECISION)
    out_row = (s * n_splits + split) * BLOCK_G + rows
    tl.store(M + out_row, m_i)
    tl.store(L + out_row, l_i)
    tl.store(ACC + out_row[:, None] * DV + dvs[None, :], acc)


@triton.jit
def _merge_splits(ACC, M, L, OUT, G, N_SPLITS, BLOCK_G: tl.constexpr, DV: tl.constexpr):
    s = tl.program_id(0)
    rows = tl.arange(0, BLOCK_G)
    dvs = tl.arange(0, DV)
    top = tl.full([BLOCK_G], -float("inf"), tl.float32)
    for j in range(0, N_SPLITS):
        top = tl.maximum(top, tl.load(M + (s * N_SPLITS + j) * BLOCK_G + rows))
    safe = tl.where(top == -float("inf"), 0.0, top)
    total = tl.zeros([BLOCK_G], tl.float32)
    out = tl.zeros([BLOCK_G, DV], tl.float32)
    for j in range(0, N_SPLITS):
        row = (s * N_SPLITS + j) * BLOCK_G + rows
        w = tl.exp(tl.load(M + row) - safe)  # 0 for an empty split (m = -inf)
        total += w * tl.load(L + row)
        out += w[:, None] * tl.load(ACC + row[:, None] * DV + dvs[None, :])
    out = out / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(OUT + (s * G + rows[:, None]) * DV + dvs[None, :], out, mask=rows[:, None] < G)


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so that the split logic is exercised
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def ring_paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    ring_k: torch.Tensor,
    ring_v: torch.Tensor,
    ring_lengths: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention of one query token per stream over its pages and its window ring; see the
    module docstring. Two kernel launches."""
    S, G, D = q.shape
    DV, W = v_pool.shape[-1], ring_k.shape[1]
    require_triton_device(q, "the fused decode kernel")
    if not decode_head_dims_ok(D, DV):
        raise ValueError(f"the fused decode kernel needs power-of-two head dims >= 16, got {D}, {DV}")
    if ring_k.shape[0] != S or ring_v.shape[:2] != ring_k.shape[:2] or ring_lengths.shape != (S,):
        raise ValueError(f"ring_k / ring_v [S, W, D], ring_lengths [S]; got {tuple(ring_k.shape)} for S={S}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q = q.to(k_pool.dtype).contiguous()
    block_g = max(16, 1 << (G - 1).bit_length())
    max_len = block_table.shape[1] * k_pool.shape[1]
    page_splits = max(
        1, min(math.ceil(2 * num_sms(q.device) / max(S, 1)), math.ceil(max_len / TOKENS_PER_TILE))
    )
    per_split = math.ceil(math.ceil(max_len / page_splits) / TOKENS_PER_TILE) * TOKENS_PER_TILE
    splits = page_splits + 1  # + the ring
    acc = torch.empty(S, splits, block_g, DV, device=q.device, dtype=torch.float32)
    m = torch.empty(S, splits, block_g, device=q.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    out = torch.zeros(S, G, DV, device=q.device, dtype=torch.float32)
    if S == 0:
        return out
    decode_split_kernel[(S, splits)](
        q, k_pool, v_pool, _int32(block_table), _int32(lengths),
        ring_k.to(k_pool.dtype).contiguous(), ring_v.to(k_pool.dtype).contiguous(), _int32(ring_lengths),
        acc, m, lsum, scale, per_split, block_table.shape[1], G, W,
        BLOCK_SIZE=k_pool.shape[1], D=D, DV=DV, BLOCK_G=block_g, TILE=TOKENS_PER_TILE,
        PRECISION="ieee" if k_pool.dtype == torch.float32 else "tf32", HAS_RING=True,
    )  # fmt: skip
    _merge_splits[(S,)](acc, m, lsum, out, G, splits, BLOCK_G=block_g, DV=DV)
    return out
