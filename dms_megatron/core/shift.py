"""The one-token shift and document boundaries (docs/dms.md section 3).

The decision produced at position t+1 decides the fate of key t. Shifting never crosses a document
boundary of a packed sequence: the last token of each document (and of the sequence) gets the fill
value (log-keep 0 / decision 0: kept; no later query of its own document can see it from outside the
window anyway).

Shape legend:
    x         [B, H, T]   per-position values (relaxed logits, decisions)
    doc_ids   [B, T] or [T] integer document id per position (equal ids = same document)
    cu_seqlens [N + 1]    cumulative document lengths, 0 = cu_seqlens[0] < ... = T (THD style)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dms_megatron.core._checks import require_ndim, require_tensor


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total_len: int | None = None) -> torch.Tensor:
    """Per-position document ids ``[T]`` from THD-style cumulative sequence lengths."""
    require_tensor("cu_seqlens", cu_seqlens)
    require_ndim("cu_seqlens", cu_seqlens, 1, "[num_docs + 1]")
    if cu_seqlens.numel() < 2 or int(cu_seqlens[0]) != 0:
        raise ValueError(
            f"cu_seqlens must start at 0 and hold at least one document, got {cu_seqlens.tolist()}"
        )
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu_seqlens.tolist()}")
    total = int(cu_seqlens[-1])
    if total_len is not None and total_len != total:
        raise ValueError(f"cu_seqlens ends at {total} but the sequence has {total_len} positions")
    ids = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(ids, lengths.long())


def check_doc_ids(doc_ids: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Validate and broadcast document ids to ``[B, T]``."""
    require_tensor("doc_ids", doc_ids)
    if doc_ids.is_floating_point() or doc_ids.is_complex() or doc_ids.dtype == torch.bool:
        raise ValueError(f"doc_ids must be an integer tensor, got dtype {doc_ids.dtype}")
    if doc_ids.dim() == 1:
        doc_ids = doc_ids.unsqueeze(0)
    if doc_ids.dim() != 2 or doc_ids.shape[-1] != length or doc_ids.shape[0] not in (1, batch):
        raise ValueError(
            f"doc_ids must be [T] or [B, T] with B={batch}, T={length}; got {tuple(doc_ids.shape)}"
        )
    return doc_ids.expand(batch, length)


def same_doc_as_next(doc_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: position t and t+1 belong to one document (False at the last position)."""
    same = doc_ids[:, 1:] == doc_ids[:, :-1]
    return F.pad(same, (0, 1), value=False)


def shift_to_previous_token(
    x: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    fill: float = 0.0,
    same_next: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[..., t] = x[..., t+1]`` within a document, ``fill`` at each document's last token.
    ``same_next``: ``same_doc_as_next`` of the document ids, ``[B, T]`` bool, where a caller keeps it
    for many layers (then ``doc_ids`` is not read)."""
    require_tensor("x", x)
    require_ndim("x", x, 3, "[B, H, T]")
    B, _, T = x.shape
    shifted = F.pad(x[..., 1:], (0, 1), value=fill)
    if same_next is None:
        if doc_ids is None:
            return shifted
        same_next = same_doc_as_next(check_doc_ids(doc_ids.to(x.device), B, T))
    elif same_next.shape != (B, T) or same_next.dtype != torch.bool:
        raise ValueError(f"same_next must be a [B, T] = [{B}, {T}] bool tensor, got {tuple(same_next.shape)}")
    return torch.where(same_next.unsqueeze(1), shifted, fill)


def shifted_log_keep(
    relaxed: torch.Tensor, doc_ids: torch.Tensor | None = None, same_next: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-key log-keep bias ``m[k] = logsigmoid(-relaxed[k+1])`` (0 where nothing follows in the doc;
    ``same_next`` as in ``shift_to_previous_token``).

    ``relaxed`` may hold -inf (eviction disabled), which gives m = 0 exactly.
    """
    require_tensor("relaxed", relaxed)
    require_ndim("relaxed", relaxed, 3, "[B, H, T]")
    return shift_to_previous_token(F.logsigmoid(-relaxed), doc_ids, fill=0.0, same_next=same_next)
