"""The norm of our local (non-Transformer-Engine) layer spec, on every device, with or without sequence
parallelism.

megatron-core 0.19.2's local spec picks Apex's ``FusedLayerNorm`` when Apex is installed (it refuses
RMSNorm, which every supported family uses) and otherwise ``WrappedTorchNorm`` (which refuses sequence
parallelism). ``LocalNorm`` builds what ``WrappedTorchNorm`` builds -- a ``torch.nn.RMSNorm`` /
``torch.nn.LayerNorm`` with fp32 weights, so checkpoints are unchanged -- and, with
``sequence_parallel``, tags its parameters ``sequence_parallel`` so that megatron's
``finalize_model_grads`` all-reduces their gradients over the TP group (each rank normalises only its
slice of the sequence). ``families.local_layer_spec`` / ``decoder_block_spec`` put it in every norm
slot, including the final norm (the trainer, the converter and the tiny test GPT build through them).

The fp32 weights are cast to the activations' dtype at use (bf16 in training): torch dispatches a norm
to its fused kernel only when input and weight share a dtype. Mixed, it fell back to the composite
form -- 8 CUDA launches a norm forward (``aten::rms_norm`` 976 launches for the 122 student norms of a
SmolLM2 step) and the pow / rsqrt / mul backward nodes, in the DMS and the vanilla step alike (H100
profiles of 2026-12-07, ``docs/results/2026-12-07_h100_tuned_step``). The product is then rounded once,
with the weight in bf16, as Transformer Engine's and Hugging Face's bf16 norms have it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _as(p: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return p if p is None or p.dtype == dtype else p.to(dtype)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with its weight cast to the input's dtype at use (the fused kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, _as(self.weight, x.dtype), self.eps)


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` with its weight and bias cast to the input's dtype at use."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            x, self.normalized_shape, _as(self.weight, x.dtype), _as(self.bias, x.dtype), self.eps
        )


class LocalNorm:
    """Build-time factory with megatron's norm signature (``build_module`` calls it with ``config``,
    ``hidden_size`` and ``eps``); returns a plain torch module."""

    def __new__(
        cls,
        config: Any,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise ValueError(
                "LocalNorm: zero-centred gamma is not supported (the supported families use none)"
            )
        if config.normalization == "RMSNorm":
            norm: torch.nn.Module = RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"LocalNorm: normalization {config.normalization!r} is not supported")
        if config.sequence_parallel:
            for param in norm.parameters():
                param.sequence_parallel = True  # type: ignore[attr-defined]  # grads all-reduced over TP
        return norm
