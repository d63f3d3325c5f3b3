"""Eviction logits and decisions (docs/dms.md sections 1-2).

Shape legend (any leading dims ``...`` are carried through):
    q            [..., Hq, D]   query heads on axis ``head_axis`` (default -2), channels last
    x            [..., d]       residual stream fed to the adapter
    logits       [..., Hkv]     one eviction logit per KV head (neuron variant: same layout as q
                                 with the head axis reduced to Hkv and the channel axis removed)
    decisions    same as logits; 1 = "evict the previous token once it leaves the window"

Names: ``evict_logits`` are raw logits l; ``relaxed`` are (l + noise) / tau; ``log_keep`` is
log(1 - sigmoid(relaxed)) = logsigmoid(-relaxed), the additive attention bias (before the shift).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import nn

from dms_megatron.core._checks import require_float, require_positive, require_tensor
from dms_megatron.core.dms_rules import (
    DEFAULT_ADAPTER_EPS,
    DEFAULT_LOGIT_OFFSET,
    DEFAULT_LOGIT_SCALE,
    evicts,
    neuron_evict_logits,
    per_layer_logits,
    scaled_logits,
    zero_neuron,
)

# neuron_evict_logits, zero_neuron and per_layer_logits live in dms_rules.py (shared with the exported
# remote code); re-exported here with the rest of the gating API.


class EvictionAdapter(nn.Module):
    """The learned adapter: ``scale * Linear(RMSNorm(x)) - offset`` with a zero-initialised Linear.

    Reads the layer's *pre-norm* residual stream ``x [..., d]`` and returns ``[..., Hkv]`` logits,
    all exactly ``-offset`` at initialisation (scaled in at least fp32).
    """

    def __init__(
        self,
        hidden_size: int,
        num_kv_heads: int,
        scale: float = DEFAULT_LOGIT_SCALE,
        offset: float = DEFAULT_LOGIT_OFFSET,
        eps: float = DEFAULT_ADAPTER_EPS,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if hidden_size <= 0 or num_kv_heads <= 0:
            raise ValueError(
                f"hidden_size and num_kv_heads must be positive, got {hidden_size} and {num_kv_heads}"
            )
        self.scale, self.offset = float(scale), float(offset)
        self.norm = nn.RMSNorm(hidden_size, eps=eps, dtype=dtype, device=device)
        self.proj = nn.Linear(hidden_size, num_kv_heads, bias=bias, dtype=dtype, device=device)
        nn.init.zeros_(self.proj.weight)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.norm.normalized_shape[0]:
            raise ValueError(
                f"adapter expects hidden size {self.norm.normalized_shape[0]}, got input {tuple(x.shape)}"
            )
        return scaled_logits(self.proj(self.norm(x)), self.scale, self.offset)


class Decisions(NamedTuple):
    """Training-time decisions of one layer.

    ``decisions``: straight-through hard decisions (forward 0/1, gradient of the soft probability).
    ``relaxed``: (l + noise) / tau, the value whose logsigmoid(-.) is the log-keep bias.
    """

    decisions: torch.Tensor
    relaxed: torch.Tensor


def relaxed_decisions(evict_logits: torch.Tensor, noise: torch.Tensor | None, tau: float) -> Decisions:
    """Gumbel-sigmoid relaxation with a straight-through hard decision (section 2).

    Computed in fp32 whatever the input dtype. ``noise=None`` means no noise (deterministic
    relaxation, useful for evaluation of the training objective).
    """
    require_tensor("evict_logits", evict_logits)
    require_float("evict_logits", evict_logits)
    require_positive("tau", tau)
    logits = evict_logits.float()
    if noise is not None:
        if noise.shape != evict_logits.shape:
            raise ValueError(
                f"noise shape {tuple(noise.shape)} must equal logits shape {tuple(evict_logits.shape)}"
            )
        logits = logits + noise.float()
    relaxed = logits / tau
    soft = torch.sigmoid(relaxed)
    hard = (soft > 0.5).to(soft.dtype)
    return Decisions(decisions=hard - soft.detach() + soft, relaxed=relaxed)


def teacher_decisions(evict_logits: torch.Tensor) -> Decisions:
    """Eviction disabled: all decisions 0 and a relaxed logit of -inf, so the log-keep bias is 0."""
    zeros = torch.zeros_like(evict_logits, dtype=torch.float32)
    return Decisions(decisions=zeros, relaxed=torch.full_like(zeros, float("-inf")))


@functools.lru_cache(maxsize=64)
def _neuron_mask(
    heads: int, dim: int, num_kv_heads: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    return zero_neuron(torch.ones(heads, dim, dtype=dtype, device=device), num_kv_heads)


def neuron_mask(q: torch.Tensor, num_kv_heads: int, head_axis: int = -2) -> torch.Tensor:
    """``zero_neuron``'s 0/1 mask for q (``q * mask == zero_neuron(q)``), shaped to broadcast against q;
    built once per (heads, head dim, KV heads, dtype, device) instead of ~8 small ops per call (kernel
    launches on a GPU, twice per layer and micro-batch); built afresh during CUDA-graph capture."""
    axis = head_axis % q.dim()
    key = (q.shape[axis], q.shape[-1], num_kv_heads, q.dtype, q.device)
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    mask = _neuron_mask.__wrapped__(*key) if capturing else _neuron_mask(*key)
    view = [1] * q.dim()
    view[axis], view[-1] = q.shape[axis], q.shape[-1]
    return mask.view(view)


def fade_neuron(q: torch.Tensor, num_kv_heads: int, keep: float, head_axis: int = -2) -> torch.Tensor:
    """q with the repurposed channel scaled by ``keep`` (1: q itself, 0: ``zero_neuron``): the
    neuron variant's fade-out at the start of a retrofit, applied where ``zero_neuron`` is."""
    if keep == 1.0:
        return q
    zeroed = q * neuron_mask(q, num_kv_heads, head_axis)
    if keep == 0.0:
        return zeroed
    return zeroed + keep * (q - zeroed)


def hard_decisions(evict_logits: torch.Tensor) -> torch.Tensor:
    """Inference decisions: no noise, no temperature; 1 where the logit is positive (``dms_rules.evicts``)."""
    return evicts(evict_logits).to(torch.int8)


__all__ = [
    "DEFAULT_LOGIT_OFFSET",
    "DEFAULT_LOGIT_SCALE",
    "Decisions",
    "EvictionAdapter",
    "fade_neuron",
    "hard_decisions",
    "neuron_evict_logits",
    "neuron_mask",
    "per_layer_logits",
    "relaxed_decisions",
    "teacher_decisions",
    "zero_neuron",
]
