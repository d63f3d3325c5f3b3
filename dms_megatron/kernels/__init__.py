"""Attention backends behind one dispatcher, all with the contract of ``core.dms_attention_reference``.

``reference``: the dense chunked core implementation (CPU, tests, oracle).
``flex``: PyTorch FlexAttention with a causal/document block mask (CUDA).
``triton``: the fused Triton kernel (``kernels.triton_dms``; CUDA, or CPU under ``TRITON_INTERPRET=1``).
``split``: cuDNN attention over the keys older than the window (bias in extra channels) plus
FlashAttention-2's sliding window, merged by log-sum-exp (``kernels.split_attention``; CUDA, bf16 / fp16,
D == Dv in 64 / 128; packed documents through FlashAttention-2's variable-length form; other inputs go to
the Triton kernel; the teacher to SDPA, or FlashAttention-2 over documents; opt-in: correct on an H100
but 2.4-11x SDPA forward + backward, docs/benchmarks.md).
``auto``: flex for CUDA tensors, reference otherwise. The Triton kernel is faster than flex on an H100
(1.4-1.7x SDPA forward + backward against 2.0-2.7x, docs/benchmarks.md) and becomes the CUDA default once
its GPU tests pass at the current tiles and its retrofit loss curve is no farther from an fp32-attention
run than flex's (``runbooks/training_speed.sh decide``; on 2026-12-08 a little farther, docs/dms.md).
"""

from __future__ import annotations

import torch

from dms_megatron.core.attention import dms_attention_reference

BACKENDS = ("auto", "reference", "flex", "triton", "split")


def dms_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    relaxed: torch.Tensor | None,
    window: int,
    scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
    backend: str = "auto",
    *,
    log_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Delayed-eviction attention ``[B, Hq, T, Dv]``; ``relaxed=None`` = plain causal (teacher).
    ``log_keep``: the shifted bias ``[B, Hkv, T]`` already computed (``kernels.decisions``) instead of
    ``relaxed``; the kernel backends only (``resolve_backend(...) != "reference"``)."""
    if log_keep is not None and relaxed is not None:
        raise ValueError("give relaxed logits or a log-keep bias, not both")
    backend = resolve_backend(backend, q)
    if log_keep is not None and backend == "reference":
        raise ValueError("the reference backend takes relaxed logits, not a log-keep bias")
    evicting = relaxed is not None or log_keep is not None

    def bias() -> torch.Tensor:
        from dms_megatron.kernels.bias import shifted_bias

        return log_keep if log_keep is not None else shifted_bias(relaxed, doc_ids)  # type: ignore[arg-type]

    if backend == "flex":
        from dms_megatron.kernels.flex import dms_attention_flex

        return dms_attention_flex(q, k, v, bias() if evicting else None, window, scale, doc_ids)
    if backend == "split":
        from dms_megatron.kernels import split_attention

        if split_attention.supported(q, v, doc_ids):
            if evicting:
                return split_attention.dms_attention_split(q, k, v, bias(), window, scale, doc_ids)
            # the teacher (no bias): causal attention of SDPA, or FA2 over documents
            return split_attention.causal_attention(q, k, v, scale, doc_ids)
        backend = "triton"
    if backend == "triton":
        from dms_megatron.kernels.triton_dms import dms_attention_triton

        return dms_attention_triton(q, k, v, bias() if evicting else None, window, scale, doc_ids)
    return dms_attention_reference(q, k, v, relaxed, window, scale, doc_ids)


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The backend ``dms_attention`` runs for ``backend`` and these queries (``auto``: flex on CUDA,
    reference elsewhere)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "flex" if q.is_cuda else "reference"
    return backend


__all__ = ["BACKENDS", "dms_attention", "resolve_backend"]
