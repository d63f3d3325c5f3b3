"""Delayed-eviction attention, the reference implementation (docs/dms.md section 4).

Shape legend:
    q              [B, Hq, T, D]    queries (after RoPE)
    k              [B, Hkv, T, D]   keys (after RoPE)
    v              [B, Hkv, T, Dv]  values
    evict_logits   [B, Hkv, T]      relaxed logit produced at each position, (l + noise) / tau
    doc_ids        [B, T] or [T]    document id per position (packed sequences), optional
    out            [B, Hq, T, Dv]
Query head h uses KV head h // (Hq // Hkv).

For query i and key k (same document, k <= i):
    score = q_i . k_k * scale                 if i - k <= window
    score = q_i . k_k * scale + m[k]          if i - k >  window
with m[k] = logsigmoid(-evict_logits[k + 1]) (the one-token shift; 0 at a document's last token).
Keys of other documents and future keys are masked.

This is the oracle for every fast kernel and the CPU training path. It is exact (fp32 or fp64
math) and memory-bounded: queries are processed in chunks, and under autograd each chunk is
recomputed in backward (activation checkpointing), so neither pass holds more than one chunk of
scores.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from dms_megatron.core._checks import require_float, require_ndim, require_non_negative_int, require_tensor
from dms_megatron.core.dms_rules import outside_window
from dms_megatron.core.shift import check_doc_ids, shifted_log_keep

# Upper bound on the number of score elements one chunk may hold (B * Hq * chunk * keys).
SCORE_BUDGET = 1 << 23


def _validate(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, evict_logits: torch.Tensor | None, window: int
) -> tuple[int, int, int, int, int]:
    for name, x in (("q", q), ("k", k), ("v", v)):
        require_tensor(name, x)
        require_ndim(name, x, 4, "[B, heads, T, D]")
        require_float(name, x)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if k.shape[:3] != v.shape[:3] or k.shape[0] != B or k.shape[2] != T:
        raise ValueError(
            f"k and v must be [B={B}, Hkv, T={T}, D]; got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[3] != D:
        raise ValueError(f"q and k head dims differ: q has D={D}, k has D={k.shape[3]}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    require_non_negative_int("window", window)
    if evict_logits is not None:
        require_tensor("evict_logits", evict_logits)
        require_float("evict_logits", evict_logits)
        if tuple(evict_logits.shape) != (B, Hkv, T):
            raise ValueError(
                f"evict_logits must be [B, Hkv, T] = {(B, Hkv, T)}, got {tuple(evict_logits.shape)}"
            )
    return B, Hq, Hkv, T, D


def _chunk_forward(
    q_chunk: torch.Tensor,  # [B, Hkv, g, C, D]
    k_prefix: torch.Tensor,  # [B, Hkv, K, D]
    v_prefix: torch.Tensor,  # [B, Hkv, K, Dv]
    log_keep: torch.Tensor | None,  # [B, Hkv, K]
    doc_q: torch.Tensor | None,  # [B, C]
    doc_k: torch.Tensor | None,  # [B, K]
    start: int,
    window: int,
    scale: float,
) -> torch.Tensor:
    C, K = q_chunk.shape[3], k_prefix.shape[2]
    scores = torch.einsum("bhgcd,bhkd->bhgck", q_chunk, k_prefix) * scale
    qpos = torch.arange(start, start + C, device=q_chunk.device).view(C, 1)
    kpos = torch.arange(K, device=q_chunk.device).view(1, K)
    distance = qpos - kpos  # [C, K]
    if log_keep is not None:
        bias = torch.where(
            outside_window(distance, window),
            log_keep[:, :, None, None, :],
            torch.zeros((), dtype=scores.dtype),
        )
        scores = scores + bias
    visible = (distance >= 0).view(1, 1, 1, C, K)
    if doc_q is not None and doc_k is not None:
        same_doc = doc_q[:, :, None] == doc_k[:, None, :]  # [B, C, K]
        visible = visible & same_doc[:, None, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhgck,bhkd->bhgcd", probs, v_prefix)


def dms_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    evict_logits: torch.Tensor | None,
    window: int,
    scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """DMS training attention with delayed, soft eviction; see the module docstring for the math.

    ``evict_logits=None`` disables eviction (plain causal attention: the teacher). Differentiable in
    q, k, v and evict_logits. Math runs in at least fp32; the output has q's dtype.
    """
    B, Hq, Hkv, T, D = _validate(q, k, v, evict_logits, window)
    g = Hq // Hkv
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    compute = torch.promote_types(q.dtype, torch.float32)
    qc = q.to(compute).view(B, Hkv, g, T, D)
    kc, vc = k.to(compute), v.to(compute)
    log_keep = None
    if evict_logits is not None:
        log_keep = shifted_log_keep(evict_logits.to(compute), doc_ids)
    docs = None if doc_ids is None else check_doc_ids(doc_ids.to(q.device), B, T)

    if chunk_size is None:
        chunk_size = max(1, SCORE_BUDGET // max(1, B * Hq * T))
    use_checkpoint = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, evict_logits)
    )
    outputs = []
    for start in range(0, T, chunk_size):
        stop = min(T, start + chunk_size)
        args = (
            qc[:, :, :, start:stop],
            kc[:, :, :stop],
            vc[:, :, :stop],
            None if log_keep is None else log_keep[:, :, :stop],
            None if docs is None else docs[:, start:stop],
            None if docs is None else docs[:, :stop],
            start,
            window,
            scale,
        )
        if use_checkpoint and stop - start < T:
            outputs.append(checkpoint(_chunk_forward, *args, use_reentrant=False))
        else:
            outputs.append(_chunk_forward(*args))
    out = torch.cat(outputs, dim=3)  # [B, Hkv, g, T, Dv]
    return out.reshape(B, Hq, T, v.shape[-1]).to(q.dtype)
