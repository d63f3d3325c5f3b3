"""One Triton kernel for the cache bookkeeping of a DMS decode step, per layer: what the torch path of
``inference.compressed_cache.CompressedKV`` does in ~20 small operations (``_commit``), in one
launch with one program per stream (sequence row x KV head).

For each stream, with ``p`` the new token's position and ``W`` the ring size (``window + 1``):

1. the new token's decision (``logits > 0``) flags its predecessor's ring slot ``(p - 1) % W`` (if
   ``p >= 1``; no logits: the original model, nothing is flagged);
2. the token in slot ``p % W`` leaves the window when ``p >= W``: it is kept unless flagged;
3. that slot's K/V are written into the stream's next page slot (block ``table[paged // block_size]``,
   reserved beforehand), unconditionally; the page count grows by one only if the token was kept;
4. the new token's K/V take the slot, its flag is cleared.

Streams touch disjoint memory (their own ring slots, flags, page count and pool blocks), so programs
never race. Contract (per layer): ``k_new [R, H, D]``, ``v_new [R, H, Dv]``, ``logits [R, H]`` or None,
``pos [R]``; ring ``[R, H, W, D(v)]``, flags ``[R, H, W]`` (bool), block table ``[R, H, max_blocks]``,
page counts ``[R, H]`` (int32), pools ``[num_blocks, block_size, D(v)]``; all updated in place.

CUDA, or CPU under ``TRITON_INTERPRET=1`` (tests); ``tests/unit/test_fused_decode.py`` holds it equal
to the torch path bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dms_megatron.kernels.triton_device import require_triton_device


@triton.jit
def _commit_kernel(
    K_NEW, V_NEW, LOGITS, POS, RING_K, RING_V, FLAG, TABLE, PAGED, K_POOL, V_POOL,
    H, W, table_stride, skr, skh, svr, svh,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HAS_LOGITS: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(0)  # stream: row * H + head
    p = tl.load(POS + s // H)
    slot = p % W
    ring = s.to(tl.int64) * W
    if HAS_LOGITS:  # the new token's decision flags its predecessor
        prev = (p + W - 1) % W
        evict = (tl.load(LOGITS + s) > 0) & (p >= 1)
        flag_prev = tl.load(FLAG + ring + prev)
        tl.store(FLAG + ring + prev, tl.where(evict, 1, flag_prev).to(flag_prev.dtype))
    kept = (tl.load(FLAG + ring + slot) == 0) & (p >= W)
    n = tl.load(PAGED + s)
    block = tl.load(TABLE + s.to(tl.int64) * table_stride + n // BLOCK_SIZE).to(tl.int64)
    dest = block * BLOCK_SIZE + n % BLOCK_SIZE
    ok = block >= 0  # reserve() guarantees the block; never write through a missing one
    dk = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    mk, mv = dk < D, dv < DV
    at_k, at_v = (ring + slot) * D + dk, (ring + slot) * DV + dv
    tl.store(K_POOL + dest * D + dk, tl.load(RING_K + at_k, mask=mk), mask=mk & ok)
    tl.store(V_POOL + dest * DV + dv, tl.load(RING_V + at_v, mask=mv), mask=mv & ok)
    tl.store(PAGED + s, n + kept.to(n.dtype))
    row, head = (s // H).to(tl.int64), (s % H).to(tl.int64)  # k_new / v_new by strides: no copy
    new_k = tl.load(K_NEW + row * skr + head * skh + dk, mask=mk)
    new_v = tl.load(V_NEW + row * svr + head * svh + dv, mask=mv)
    tl.store(RING_K + at_k, new_k.to(RING_K.dtype.element_ty), mask=mk)
    tl.store(RING_V + at_v, new_v.to(RING_V.dtype.element_ty), mask=mv)
    tl.store(FLAG + ring + slot, tl.zeros([], dtype=tl.int8).to(FLAG.dtype.element_ty))


def commit_decode_token(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    logits: torch.Tensor | None,
    pos: torch.Tensor,
    ring_k: torch.Tensor,
    ring_v: torch.Tensor,
    ring_flag: torch.Tensor,
    block_table: torch.Tensor,
    paged: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
) -> None:
    """One layer's cache update for one new token per row, in place; see the module docstring."""
    require_triton_device(k_new, "the decode commit kernel")
    R, H, W, D = ring_k.shape
    DV = ring_v.shape[-1]
    in_place = {"ring_k": ring_k, "ring_v": ring_v, "ring_flag": ring_flag, "block_table": block_table,
                "paged": paged, "k_pool": k_pool, "v_pool": v_pool}  # fmt: skip
    for name, x in in_place.items():
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place)")
    if paged.dtype != torch.int32 or block_table.dtype != torch.int32:
        raise ValueError(f"paged and block_table must be int32, got {paged.dtype}, {block_table.dtype}")
    if k_new.shape != (R, H, D) or v_new.shape != (R, H, DV) or pos.shape != (R,):
        got = f"{tuple(k_new.shape)}, {tuple(v_new.shape)}, {tuple(pos.shape)}; ring {tuple(ring_k.shape)}"
        raise ValueError(f"k_new [R, H, D], v_new [R, H, Dv], pos [R] for a ring [R, H, W, D]; got {got}")
    if R == 0:
        return
    if k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    has_logits = logits is not None
    _commit_kernel[(R * H,)](
        k_new, v_new, logits.float().contiguous() if has_logits else k_new,
        pos, ring_k, ring_v, ring_flag.view(torch.uint8), block_table, paged, k_pool, v_pool,
        H, W, block_table.shape[-1], k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        D=D, DV=DV, BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(DV),
        BLOCK_SIZE=k_pool.shape[1], HAS_LOGITS=has_logits,
    )  # fmt: skip
