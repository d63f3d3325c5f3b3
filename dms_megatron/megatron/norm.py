"""The norm of our local (non-Transformer-Engine) layer spec, on every device, with or without sequence
parallelism.

megatron-core 0.19.2's local spec picks Apex's ``FusedLayerNorm`` when Apex is installed (it refuses
RMSNorm, which every supported family uses) and otherwise ``WrappedTorchNorm`` (which refuses sequence
parallelism). ``LocalNorm`` is what ``WrappedTorchNorm`` builds -- ``torch.nn.RMSNorm`` /
``torch.nn.LayerNorm`` with fp32 weights, so numerics and checkpoints are unchanged -- and, with
``sequence_parallel``, tags its parameters ``sequence_parallel`` so that megatron's
``finalize_model_grads`` all-reduces their gradients over the TP group (each rank normalises only its
slice of the sequence). ``families.local_layer_spec`` / ``decoder_block_spec`` put it in every norm
slot, including the final norm (the trainer, the converter and the tiny test GPT build through them).
"""

from __future__ import annotations

from typing import Any

import torch


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
            norm: torch.nn.Module = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"LocalNorm: normalization {config.normalization!r} is not supported")
        if config.sequence_parallel:
            for param in norm.parameters():
                param.sequence_parallel = True  # type: ignore[attr-defined]  # grads all-reduced over TP
        return norm
