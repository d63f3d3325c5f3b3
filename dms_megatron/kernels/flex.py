"""DMS training attention with PyTorch FlexAttention (CUDA).

Shape legend (same contract as ``core.dms_attention_reference``):
    q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv], log_keep [B, Hkv, T] or None (the shifted bias),
    doc_ids [B, T] or [T] or None  ->  out [B, Hq, T, Dv]

Layout: KV heads are folded into the batch (queries ``[B*Hkv, g, T, D]``, keys ``[B*Hkv, 1, T, D]``,
bias ``[B*Hkv, T]``), so ``score_mod`` indexes the per-key bias with the batch index only. Indexing
the bias per query head (``h // g``) instead was measured 8x slower on H100.

The causal (or causal + same-document) ``BlockMask`` skips tiles above the diagonal and across
documents. ``flex_attention`` is compiled once per process; window and bias are captured tensors,
so a new step, layer or bias value does not recompile.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from dms_megatron.core.dms_rules import outside_window
from dms_megatron.core.shift import check_doc_ids


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=32)
def _causal_block_mask(T: int, device: str) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return create_block_mask(causal, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


def _document_block_mask(doc_folded: torch.Tensor) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    BH, T = doc_folded.shape

    def causal_same_doc(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_folded[b, q_idx] == doc_folded[b, kv_idx])

    return create_block_mask(causal_same_doc, B=BH, H=None, Q_LEN=T, KV_LEN=T, device=doc_folded.device)


# The layers of one micro-batch share one doc_ids tensor (DMSCoreAttention computes it once per
# PackedSeqParams): build its block mask once, not once per layer. Holding the tensor keeps its id valid.
_doc_mask_cache: list[Any] = [None, None, None]  # [doc_ids tensor, Hkv, BlockMask]


def _cached_document_block_mask(doc_ids: torch.Tensor, B: int, T: int, Hkv: int, device: Any) -> Any:
    if _doc_mask_cache[0] is doc_ids and _doc_mask_cache[1] == Hkv:
        return _doc_mask_cache[2]
    docs = check_doc_ids(doc_ids.to(device), B, T)
    mask = _document_block_mask(docs.repeat_interleave(Hkv, dim=0).contiguous())
    _doc_mask_cache[:] = [doc_ids, Hkv, mask]
    return mask


@functools.lru_cache(maxsize=32)
def _window_tensor(window: int, device: torch.device) -> torch.Tensor:
    """The window as a captured int32 device tensor, made once per (window, device): building it per
    layer copies from the host and synchronises the stream (measured: one sync per layer per micro-batch
    in the student forward on an H100). Never an inference tensor: training may reuse it."""
    with torch.inference_mode(False):
        return torch.tensor(window, device=device, dtype=torch.int32)


def dms_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_keep: torch.Tensor | None,
    window: int,
    scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """FlexAttention DMS attention; see the module docstring. ``log_keep``: the shifted bias ``[B, Hkv, T]``
    (``kernels.bias.shifted_bias``; None: plain causal). Inputs must be CUDA tensors."""
    if not q.is_cuda:
        raise ValueError("the flex backend needs CUDA tensors; use attention_backend='reference' on CPU")
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qf = q.reshape(B * Hkv, g, T, D)
    kf = k.reshape(B * Hkv, 1, T, D)
    vf = v.reshape(B * Hkv, 1, T, v.shape[-1])
    if doc_ids is None:
        block_mask = _causal_block_mask(T, str(q.device))
    else:
        block_mask = _cached_document_block_mask(doc_ids, B, T, Hkv, q.device)
    score_mod = None
    if log_keep is not None:
        # fp32 bias: flex computes scores in fp32 and the bias gradient accumulates per key
        log_keep = log_keep.float().reshape(B * Hkv, T)
        win = _window_tensor(window, q.device)

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(outside_window(q_idx - kv_idx, win), score + log_keep[b, kv_idx], score)

    out = _compiled_flex()(
        qf, kf, vf, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=g > 1
    )
    return out.reshape(B, Hq, T, v.shape[-1])
