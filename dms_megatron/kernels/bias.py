"""The attention backends' log-keep bias: ``core.shift.shifted_log_keep`` with the document mask of the
one-token shift (``same_doc_as_next``) built once per micro-batch instead of once per layer.

The document ids of a packed micro-batch are one tensor that every layer receives (the Megatron layers
keep it on ``packed_seq_params``), so the mask is kept for the last ids object seen, as
``triton_dms`` keeps the document bounds.
"""

from __future__ import annotations

import torch

from dms_megatron.core.shift import check_doc_ids, same_doc_as_next, shifted_log_keep

_same_next_cache: list = [None, None, None]  # [doc_ids object, (B, T, device), mask]


def same_next_mask(doc_ids: torch.Tensor, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """``same_doc_as_next`` of ``doc_ids`` broadcast to ``[batch, length]`` on ``device``, reused while
    the same ids object comes back with the same shape."""
    key = (batch, length, device)
    if _same_next_cache[0] is doc_ids and _same_next_cache[1] == key:
        return _same_next_cache[2]
    mask = same_doc_as_next(check_doc_ids(doc_ids.to(device), batch, length))
    _same_next_cache[:] = [doc_ids, key, mask]
    return mask


def shifted_bias(relaxed: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
    """``shifted_log_keep(relaxed.float(), doc_ids)`` ``[B, H, T]`` fp32, the document mask cached."""
    B, _, T = relaxed.shape
    same = None if doc_ids is None else same_next_mask(doc_ids, B, T, relaxed.device)
    return shifted_log_keep(relaxed.float(), same_next=same)


__all__ = ["same_next_mask", "shifted_bias"]
