"""Triton decode attention in one launch: a split-K kernel (``decode_split_kernel``) over each stream's
pages and, fused, its window ring, whose last program to finish for a stream merges that stream's splits.
``paged_decode``'s ``triton`` backend runs the same kernel without the ring (and has it write the
log-sum-exp too); ``ring_paged_decode_attention`` is DMS decode attention.

A stream (one sequence, one KV head) holds its recent tokens in a dense ring of ``W`` slots and its
older kept tokens in pages (``kernels.paged_decode``). The unfused path runs the paged kernel, then
separate torch operations for merging its splits, attending over the ring and merging the two; here the
ring is one more split of the paged kernel (its slots ``0 .. ring_len - 1`` are all visible: delayed
eviction keeps every ring token visible to the next query). Each program stores its split's running max,
normaliser and unnormalised output, then counts itself in on the stream's arrival counter (an atomic
add, acquire-release at GPU scope, after a block barrier: its stores are visible before its arrival); the
program that arrives last merges the splits by log-sum-exp in fixed split order (so the result does not
depend on which program merges) and resets the counter to 0. A stream with one split writes its result
directly. No second kernel and no host work per launch beyond the launch itself.

The counters are one int32 per stream in a buffer kept per device (``_arrival_counters``): zero between
launches, grown outside CUDA-graph capture (a kernel captured at a size must first have run eagerly at
it, which the engine's warm-up step does), never freed (a captured graph keeps pointing at it). Two
launches must not run concurrently on one device (they would share counters): the engine decodes on one
CUDA stream.

Contract: q [S, g, D]; k_pool / v_pool [num_blocks, block_size, D(v)]; block_table [S, max_blocks];
lengths [S] (paged tokens); ring_k / ring_v [S, W, D(v)]; ring_lengths [S] (valid ring slots, a prefix)
-> out [S, g, Dv] (fp32, or ``out_dtype``), softmax over pages and ring together (0 for a stream with
neither).

CUDA, or CPU under ``TRITON_INTERPRET=1`` (tests; the interpreter runs programs one after another, so it
checks the arrival logic and the merge but not the GPU's memory ordering, which ``tests/gpu`` does).
``tests/unit/test_fused_decode.py`` holds it equal to the unfused reference composition.
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
def _write_result(acc, m_i, l_i, OUT, LSE, s, rows, dvs, G, DV: tl.constexpr, WRITE_LSE: tl.constexpr):
    """Normalised output (0 for no keys) and, with ``WRITE_LSE``, log-sum-exp (-inf for no keys)."""
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + (s * G + rows[:, None]) * DV + dvs[None, :], out, mask=rows[:, None] < G)
    if WRITE_LSE:
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), -float("inf"))
        tl.store(LSE + s * G + rows, lse, mask=rows < G)


@triton.jit
def _merge_splits(ACC, M, L, s, n_splits, rows, dvs, BLOCK_G: tl.constexpr, DV: tl.constexpr):
    """The stream's splits merged by log-sum-exp in split order: (unnormalised output, max, normaliser).
    Loads bypass L1 (``.cg``): other programs wrote these rows."""
    top = tl.full([BLOCK_G], -float("inf"), tl.float32)
    for j in range(0, n_splits):
        top = tl.maximum(top, tl.load(M + (s * n_splits + j) * BLOCK_G + rows, cache_modifier=".cg"))
    safe = tl.where(top == -float("inf"), 0.0, top)
    total = tl.zeros([BLOCK_G], tl.float32)
    out = tl.zeros([BLOCK_G, DV], tl.float32)
    for j in range(0, n_splits):
        row = (s * n_splits + j) * BLOCK_G + rows
        w = tl.exp(tl.load(M + row, cache_modifier=".cg") - safe)  # 0 for an empty split (m = -inf)
        total += w * tl.load(L + row, cache_modifier=".cg")
        out += w[:, None] * tl.load(ACC + row[:, None] * DV + dvs[None, :], cache_modifier=".cg")
    return out, safe, total


@triton.jit
def decode_split_kernel(
    Q, K, V, TABLE, LENS, RK, RV, RLENS, ACC, M, L, ARRIVED, OUT, LSE,
    scale, tokens_per_split, table_stride, G, W,
    BLOCK_SIZE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_G: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr, HAS_RING: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):  # fmt: skip
    """Program (stream, split): a share of the stream's pages, or (``HAS_RING``, the last split) its
    window ring; the last program of a stream to arrive writes the stream's result (module docstring)."""
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
    if n_splits == 1:
        _write_result(acc, m_i, l_i, OUT, LSE, s, rows, dvs, G, DV, WRITE_LSE)
    else:
        out_row = (s * n_splits + split) * BLOCK_G + rows
        tl.store(M + out_row, m_i)
        tl.store(L + out_row, l_i)
        tl.store(ACC + out_row[:, None] * DV + dvs[None, :], acc)
        tl.debug_barrier()  # every thread's stores issued before this program's arrival (a release)
        arrived = tl.atomic_add(ARRIVED + s, 1, sem="acq_rel", scope="gpu")
        if arrived == n_splits - 1:  # the last split of this stream: merge them all
            tl.debug_barrier()
            acc, m_i, l_i = _merge_splits(ACC, M, L, s, n_splits, rows, dvs, BLOCK_G, DV)
            _write_result(acc, m_i, l_i, OUT, LSE, s, rows, dvs, G, DV, WRITE_LSE)
            tl.store(ARRIVED + s, 0)  # ready for the next launch


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so that the split logic is exercised
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def page_split_count(streams: int, max_len: int, device: torch.device) -> int:
    """Programs sharing each stream's pages: about two programs per SM in all, at least a tile each."""
    return max(1, min(math.ceil(2 * num_sms(device) / max(streams, 1)), math.ceil(max_len / TOKENS_PER_TILE)))


_ARRIVALS: dict[torch.device, list[torch.Tensor]] = {}


def _arrival_counters(device: torch.device, streams: int) -> torch.Tensor:
    """One zeroed int32 arrival counter per stream on ``device``; see the module docstring."""
    held = _ARRIVALS.setdefault(device, [])
    if held and held[-1].numel() >= streams:
        return held[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"the decode kernel's arrival counters must grow to {streams} streams during CUDA-graph "
            "capture; run it once eagerly at this size first"
        )
    size = max(streams, 2 * held[-1].numel() if held else 512)
    held.append(torch.zeros(size, dtype=torch.int32, device=device))
    return held[-1]


def split_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    ring: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    with_lse: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One launch of ``decode_split_kernel``: ``(out [S, g, Dv] out_dtype, lse [S, g] fp32 or None)`` over
    each stream's pages and, given ``ring = (ring_k, ring_v, ring_lengths)``, its window ring (softmax in
    fp32; the output rounded to ``out_dtype`` as it is stored). Splits: about two programs per SM in all
    (flash-decoding split-K when there are few streams)."""
    S, G, D = q.shape
    DV = v_pool.shape[-1]
    if not decode_head_dims_ok(D, DV):
        raise ValueError(f"the Triton decode kernel needs power-of-two head dims >= 16, got {D}, {DV}")
    q = q.to(k_pool.dtype).contiguous()
    block_g = max(16, 1 << (G - 1).bit_length())
    max_len = block_table.shape[1] * k_pool.shape[1]
    page_splits = page_split_count(S, max_len, q.device)
    per_split = math.ceil(math.ceil(max_len / page_splits) / TOKENS_PER_TILE) * TOKENS_PER_TILE
    splits = page_splits + (ring is not None)
    out = torch.empty(S, G, DV, device=q.device, dtype=out_dtype)  # every row written by the kernel
    lse = torch.empty(S, G, device=q.device, dtype=torch.float32) if with_lse else None
    if S == 0:
        return out, lse
    if splits > 1:
        acc = torch.empty(S, splits, block_g, DV, device=q.device, dtype=torch.float32)
        m = torch.empty(S, splits, block_g, device=q.device, dtype=torch.float32)
        lsum = torch.empty_like(m)
        arrived = _arrival_counters(q.device, S)
    lens = _int32(lengths)
    if splits == 1:  # one split writes its stream's result itself: no partials, no counters (not read)
        acc = m = lsum = torch.empty(1, device=q.device, dtype=torch.float32)
        arrived = lens
    if ring is None:
        ring_k = ring_v = k_pool
        ring_lengths, W = lens, 0  # not read
    else:
        ring_k, ring_v = (t.to(k_pool.dtype).contiguous() for t in ring[:2])
        ring_lengths, W = _int32(ring[2]), ring_k.shape[1]
    decode_split_kernel[(S, splits)](
        q, k_pool, v_pool, _int32(block_table), lens, ring_k, ring_v, ring_lengths,
        acc, m, lsum, arrived, out, out if lse is None else lse,
        scale, per_split, block_table.shape[1], G, W,
        BLOCK_SIZE=k_pool.shape[1], D=D, DV=DV, BLOCK_G=block_g, TILE=TOKENS_PER_TILE,
        PRECISION="ieee" if k_pool.dtype == torch.float32 else "tf32", HAS_RING=ring is not None,
        WRITE_LSE=with_lse,
    )  # fmt: skip
    return out, lse


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
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Softmax attention of one query token per stream over its pages and its window ring; see the
    module docstring. One kernel launch; the output in ``out_dtype`` (fp32 softmax either way)."""
    S, D = q.shape[0], q.shape[-1]
    require_triton_device(q, "the fused decode kernel")
    if ring_k.shape[0] != S or ring_v.shape[:2] != ring_k.shape[:2] or ring_lengths.shape != (S,):
        raise ValueError(f"ring_k / ring_v [S, W, D], ring_lengths [S]; got {tuple(ring_k.shape)} for S={S}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    ring = (ring_k, ring_v, ring_lengths)
    return split_decode(q, k_pool, v_pool, block_table, lengths, scale, ring, out_dtype=out_dtype)[0]
