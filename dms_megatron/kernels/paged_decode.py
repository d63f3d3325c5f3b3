"""Paged decode attention for compressed KV caches: one query token per stream, heads folded into the
batch (a stream is one (sequence, KV head); its ``g`` query heads form the rows of a small MQA problem).

Contract (every backend):
    q [S, g, D], k_pool / v_pool [num_blocks, block_size, D(v)], block_table [S, max_blocks] (int32,
    block ids of the stream's slots in order), lengths [S] (tokens stored per stream, slots 0..len-1)
    -> out [S, g, Dv] fp32 (softmax-normalised over the stream's tokens, 0 where len == 0),
       lse [S, g] fp32 (natural-log sum of exp(scores), -inf where len == 0).

``lse`` lets the caller merge this with attention over other keys (the DMS window ring) exactly
(``merge_attention``).

Backends: ``reference`` (torch gather, any device), ``triton`` (split-K flash-decoding kernel that merges
its splits itself, ``fused_decode.split_decode`` without the ring: one launch; CUDA, or CPU under
``TRITON_INTERPRET=1``),
``flash_attn`` (``flash_attn_with_kvcache`` with ``block_table``; needs flash-attn installed and a block
size that is a multiple of 256; untested here, as flash-attn cannot be installed on our machines),
``auto``: flash_attn when installed and the block size allows it, else triton on CUDA, else reference.
``fused`` (for ``CompressedKV``, not this function): pages and window ring in one kernel
(``kernels.fused_decode``); what ``CompressedKV`` runs for ``auto`` on CUDA
(``inference.compressed_cache.decode_backend``).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch

BACKENDS = ("auto", "reference", "triton", "flash_attn", "fused")
TOKENS_PER_TILE = 64


def _check(q, k_pool, v_pool, block_table, lengths) -> None:
    if q.dim() != 3 or k_pool.dim() != 3 or v_pool.dim() != 3:
        raise ValueError(f"q [S, g, D], pools [blocks, block_size, D]; got {q.shape}, {k_pool.shape}")
    if block_table.shape[0] != q.shape[0] or lengths.shape != (q.shape[0],):
        raise ValueError(
            f"block_table {tuple(block_table.shape)} / lengths {tuple(lengths.shape)} vs S={q.shape[0]}"
        )
    if q.shape[-1] != k_pool.shape[-1]:
        raise ValueError(f"head dim of q ({q.shape[-1]}) and keys ({k_pool.shape[-1]}) differ")


def paged_decode_reference(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather every stream's slots into a padded tensor and run masked softmax attention in fp32."""
    S, bs = q.shape[0], k_pool.shape[1]
    width = int(lengths.max()) if S else 0
    if width == 0:
        return q.new_zeros(S, q.shape[1], v_pool.shape[-1], dtype=torch.float32), q.new_full(
            (S, q.shape[1]), -math.inf, dtype=torch.float32
        )
    slot = torch.arange(width, device=q.device)
    blocks = block_table[:, slot // bs].long().clamp(min=0)  # [S, width]
    k = k_pool[blocks, slot % bs].float()  # [S, width, D]
    v = v_pool[blocks, slot % bs].float()
    valid = slot[None] < lengths[:, None]
    scores = torch.einsum("sgd,swd->sgw", q.float(), k) * scale
    scores = scores.masked_fill(~valid[:, None], -math.inf)
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - lse.clamp(min=-1e30)[..., None]).nan_to_num(0.0)
    return torch.einsum("sgw,swd->sgd", probs, v), lse


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Exact softmax over the union of disjoint key sets from per-set ``(out, lse)``; out ``[..., Dv]``."""
    lses = torch.stack([lse for _, lse in parts])  # [P, ...]
    top = lses.max(0).values.clamp(min=-1e30)
    weights = torch.exp(lses - top)  # 0 for empty sets
    total = weights.sum(0)
    out = sum(w[..., None] * o for w, (o, _) in zip(weights, parts, strict=True))
    return out / total[..., None]


@functools.cache
def _flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def pick_backend(device: torch.device, block_size: int, backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"paged decode backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        interpreted = backend in ("triton", "fused") and os.environ.get("TRITON_INTERPRET") == "1"
        if backend != "reference" and device.type != "cuda" and not interpreted:
            raise ValueError(f"paged decode backend {backend!r} needs CUDA tensors")
        if backend == "flash_attn" and block_size % 256:
            raise ValueError(f"flash_attn paged KV needs a block size multiple of 256, got {block_size}")
        return backend
    if device.type != "cuda":
        return "reference"
    if _flash_attn_available() and block_size % 256 == 0:
        return "flash_attn"
    return "triton"


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of one query token per stream against its paged keys; see the module docstring."""
    _check(q, k_pool, v_pool, block_table, lengths)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    backend = pick_backend(q.device, k_pool.shape[1], backend)
    if backend == "reference":
        return paged_decode_reference(q, k_pool, v_pool, block_table, lengths, scale)
    if backend == "flash_attn":
        return _flash_attn(q, k_pool, v_pool, block_table, lengths, scale)
    if backend == "fused":
        raise ValueError("the fused backend attends over pages and ring together: kernels.fused_decode")
    return _triton_decode(q, k_pool, v_pool, block_table, lengths, scale)


def _flash_attn(q, k_pool, v_pool, block_table, lengths, scale):
    from flash_attn import flash_attn_with_kvcache

    out, lse = flash_attn_with_kvcache(
        q[:, None],  # [S, 1 token, g heads, D]
        k_pool[:, :, None],  # [blocks, block_size, 1 KV head, D]
        v_pool[:, :, None],
        cache_seqlens=lengths.int(),
        block_table=block_table.int(),
        softmax_scale=scale,
        causal=False,
        return_softmax_lse=True,
    )
    out, lse = out[:, 0].float(), lse[..., 0].float()  # lse [S, g, 1]
    empty = lengths == 0
    return out.masked_fill(empty[:, None, None], 0.0), lse.masked_fill(empty[:, None], -math.inf)


@functools.cache
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_head_dims_ok(d: int, dv: int) -> bool:
    """Whether the Triton decode kernels (this split kernel and ``fused_decode``'s) take these head dims:
    powers of two, queries / keys >= 16."""
    return d >= 16 and d & (d - 1) == 0 and dv > 0 and dv & (dv - 1) == 0


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.int().contiguous()


def _triton_decode(q, k_pool, v_pool, block_table, lengths, scale):
    from dms_megatron.kernels.fused_decode import split_decode

    return split_decode(q, k_pool, v_pool, block_table, lengths, scale, with_lse=True)
