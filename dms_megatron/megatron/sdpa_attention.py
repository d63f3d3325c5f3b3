"""Plain causal core attention on ``torch.nn.functional.scaled_dot_product_attention`` for Megatron's
local layer spec: the fused-attention *vanilla* reference of ``benchmarks/step_throughput.py``.

Megatron's local ``DotProductAttention`` materialises the scores (softmax, mask and casts in the
backward); a vanilla run on a cluster would use Transformer Engine's fused attention instead. On an
image without TE, SDPA (FlashAttention / cuDNN / memory-efficient kernels on CUDA) stands in for it, so
the retrofit step is also compared with a vanilla step whose attention is fused. Not a DMS path: no
eviction, no packed documents, no context parallelism.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec


class SDPACoreAttention(MegatronModule):
    """Causal self-attention ``[s, b, np, hn]`` -> ``[s, b, np * hn]`` with grouped KV heads."""

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
        **_: Any,
    ) -> None:
        super().__init__(config=config)
        if attention_type != "self":
            raise NotImplementedError("SDPACoreAttention is causal self-attention only")
        if getattr(config, "context_parallel_size", 1) > 1:
            raise NotImplementedError("SDPACoreAttention does not split the sequence (context parallelism)")
        self.layer_number, self.softmax_scale = layer_number, softmax_scale
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.dropout = float(dropout)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
        **_: Any,
    ) -> torch.Tensor:
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError(
                "SDPACoreAttention takes unpacked causal batches without a mask or bias"
            )
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, hn]
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
            scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def with_sdpa_core_attention(layer_spec: ModuleSpec) -> ModuleSpec:
    """A copy of a local ``TransformerLayer`` spec whose self-attention uses ``SDPACoreAttention``."""
    attn = getattr(layer_spec.submodules, "self_attention", None)
    if not isinstance(attn, ModuleSpec) or getattr(attn.submodules, "core_attention", None) is None:
        raise ValueError("the layer spec has no self_attention ModuleSpec with a core_attention slot")
    spec = copy.copy(layer_spec)
    spec.submodules = copy.copy(layer_spec.submodules)
    new_attn = copy.copy(attn)
    new_attn.submodules = copy.copy(attn.submodules)
    new_attn.submodules.core_attention = SDPACoreAttention
    spec.submodules.self_attention = new_attn
    return spec


__all__ = ["SDPACoreAttention", "with_sdpa_core_attention"]
