"""Eviction logits and decisions (dms_algorithm.md sections 1-2).

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

from typing import NamedTuple

import torch
from torch import nn

from dms_megatron.core._checks import require_float, require_positive, require_tensor

DEFAULT_LOGIT_SCALE = 100.0
DEFAULT_LOGIT_OFFSET = 5.0


def _group_size(num_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"number of query heads ({num_heads}) must be a positive multiple of the number of "
            f"KV heads ({num_kv_heads})"
        )
    return num_heads // num_kv_heads


def _neuron_index(q: torch.Tensor, num_kv_heads: int, head_axis: int) -> tuple[int, int]:
    require_tensor("q", q)
    require_float("q", q)
    if q.dim() < 2:
        raise ValueError(f"q needs a head axis and a channel axis, got shape {tuple(q.shape)}")
    axis = head_axis % q.dim()
    if axis == q.dim() - 1:
        raise ValueError("head_axis must not be the channel (last) axis")
    return axis, _group_size(q.shape[axis], num_kv_heads)


def neuron_evict_logits(
    q: torch.Tensor,
    num_kv_heads: int,
    scale: float = DEFAULT_LOGIT_SCALE,
    offset: float = DEFAULT_LOGIT_OFFSET,
    head_axis: int = -2,
) -> torch.Tensor:
    """Read the repurposed neuron: ``scale * q[first head of each group, D-1] - offset``.

    Call it on q after q-layernorm and before RoPE. The result keeps q's layout with the head axis
    reduced to one entry per KV group and the channel axis dropped (``[..., Hkv]`` for the default
    ``head_axis=-2``). Differentiable in q. Scaled in fp32 (bf16 times 100 would be too coarse).
    """
    axis, g = _neuron_index(q, num_kv_heads, head_axis)
    channel = q[..., -1]  # drops the channel axis; the head axis keeps its index
    first_heads = torch.arange(0, q.shape[axis], g, device=q.device)
    raw = channel.index_select(axis, first_heads)
    return raw.to(torch.promote_types(raw.dtype, torch.float32)) * scale - offset


def zero_neuron(q: torch.Tensor, num_kv_heads: int, head_axis: int = -2) -> torch.Tensor:
    """Return a copy of q with the repurposed channel (D-1 of each group's first head) set to 0.

    Apply before RoPE and again after it: rotate-half RoPE mixes channel D-1 with D/2-1, so a single
    zeroing would let the value leak back. Out of place, so views of a fused QKV buffer are safe.
    """
    axis, g = _neuron_index(q, num_kv_heads, head_axis)
    keep = torch.ones(q.shape[axis], q.shape[-1], dtype=q.dtype, device=q.device)
    keep[::g, -1] = 0
    view = [1] * q.dim()
    view[axis], view[-1] = q.shape[axis], q.shape[-1]
    return q * keep.view(view)


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
        eps: float = 1e-6,
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
        raw = self.proj(self.norm(x))
        return raw.to(torch.promote_types(raw.dtype, torch.float32)) * self.scale - self.offset


def per_layer_logits(logits: torch.Tensor, head_axis: int = -1) -> torch.Tensor:
    """Decisions per layer: broadcast KV head 0's logit to every KV head (same shape out)."""
    axis = head_axis % logits.dim()
    return logits.narrow(axis, 0, 1).expand_as(logits)


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


def hard_decisions(evict_logits: torch.Tensor) -> torch.Tensor:
    """Inference decisions: no noise, no temperature; 1 where the logit is positive."""
    return (evict_logits > 0).to(torch.int8)
