"""Compression loss, CR schedule and single-device logit distillation (docs/dms.md sections 5 and 8).

Shape legend:
    decisions  [B, H, T]  straight-through hard decisions of one layer (or [B, L, H, T] stacked)
    valid      [B, T]     bool, True where a position counts (padding excluded)
    logits     [..., V]   student / teacher next-token logits (any leading dims, vocab last)
    mask       [...]      token weights for the KD mean (bool or float), same leading dims
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from dms_megatron.core._checks import (
    require_cr,
    require_float,
    require_non_negative_int,
    require_positive,
    require_tensor,
)

KLDirection = Literal["student_teacher", "teacher_student"]
KL_DIRECTIONS: tuple[str, ...] = ("student_teacher", "teacher_student")


# ----------------------------------------------------------------------------- compression loss


def decision_sums(
    decisions: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sum of decisions and the number of counted decisions, both ``[B]`` (>= fp32).

    These partial sums add up across layers, heads and pipeline stages, which is what lets the
    global (all-layer) hinge be computed exactly under pipeline parallelism.
    """
    require_tensor("decisions", decisions)
    if decisions.dim() not in (3, 4):
        raise ValueError(f"decisions must be [B, H, T] or [B, L, H, T], got {tuple(decisions.shape)}")
    d = decisions.to(torch.promote_types(decisions.dtype, torch.float32))
    d = d.flatten(1, -2) if d.dim() == 4 else d  # [B, H', T]
    B, H, T = d.shape
    if valid is None:
        return d.sum(dim=(1, 2)), torch.full((B,), float(H * T), dtype=d.dtype, device=d.device)
    if valid.shape != (B, T):
        raise ValueError(f"valid must be [B, T] = {(B, T)}, got {tuple(valid.shape)}")
    w = valid.to(d.dtype).unsqueeze(1)
    return (d * w).sum(dim=(1, 2)), w.sum(dim=(1, 2)) * H


def compression_hinge(total: torch.Tensor, count: torch.Tensor, target_fraction: float) -> torch.Tensor:
    """``mean_b relu(target - total_b / count_b)``: one-sided, punishes only too little eviction."""
    if not 0.0 <= target_fraction < 1.0:
        raise ValueError(f"target_fraction must be in [0, 1), got {target_fraction}")
    frac = total / count.clamp(min=1.0)
    return torch.relu(target_fraction - frac).mean()


def compression_loss(
    decisions: torch.Tensor | Sequence[torch.Tensor],
    target_fraction: float,
    valid: torch.Tensor | None = None,
    per_layer: bool = False,
) -> torch.Tensor:
    """Compression loss over all layers of a sample.

    ``decisions`` is one ``[B, L, H, T]`` tensor or a sequence of per-layer ``[B, H, T]`` tensors.
    ``per_layer=False`` (default, the paper's objective): one hinge per sample on the mean over all
    layers. ``per_layer=True``: the stricter named variant, mean over layers of per-layer hinges.
    """
    layers = (
        list(decisions.unbind(1))
        if isinstance(decisions, torch.Tensor) and decisions.dim() == 4
        else list(decisions)
    )
    if not layers:
        raise ValueError("compression_loss needs at least one layer of decisions")
    sums = [decision_sums(d, valid) for d in layers]
    if per_layer:
        return torch.stack([compression_hinge(s, c, target_fraction) for s, c in sums]).mean()
    total = torch.stack([s for s, _ in sums]).sum(0)
    count = torch.stack([c for _, c in sums]).sum(0)
    return compression_hinge(total, count, target_fraction)


# ----------------------------------------------------------------------------- schedule


def target_fraction(cr: float) -> float:
    """Fraction of decisions that must be 'evict' for a decision-rate compression ratio ``cr``."""
    require_cr("cr", cr)
    return 1.0 - 1.0 / cr


def memory_cr(decision_cr: float, context: int, window: int) -> float:
    """Memory CR (tokens seen / tokens held) after ``context`` tokens when a fraction ``1 / decision_cr``
    of the tokens older than the window is kept: the last ``window + 1`` tokens are always held
    (delayed eviction), so a stream holds ``min(context, window + 1) + older / decision_cr`` tokens.
    Exact for the total over all streams when decisions do not depend on position."""
    require_cr("decision_cr", decision_cr)
    kept_window = min(context, window + 1)
    return context / (kept_window + (context - kept_window) / decision_cr)


def max_memory_cr(context: int, window: int) -> float:
    """The largest memory CR reachable at ``context`` tokens: only the window is held."""
    return context / min(context, window + 1)


def decision_cr_for_memory(target_memory_cr: float, context: int, window: int) -> float:
    """The decision-rate CR whose tokens-held total at ``context`` tokens gives ``target_memory_cr``
    (inverse of ``memory_cr``); a ValueError when the window alone holds more than the target allows."""
    require_cr("target_memory_cr", target_memory_cr)
    kept_window = min(context, window + 1)
    older = context - kept_window
    budget = context / target_memory_cr - kept_window  # older tokens the target lets a stream keep
    if target_memory_cr == 1.0:
        return 1.0
    if budget <= 0 or older <= 0:
        raise ValueError(
            f"memory CR {target_memory_cr:g} at {context} tokens is out of reach with window {window}: the "
            f"window alone holds {kept_window} tokens per stream, i.e. at most CR "
            f"{max_memory_cr(context, window):.3g}; lower the target, shrink the window or raise the context"
        )
    return max(1.0, older / budget)


@dataclass(frozen=True)
class CRSchedule:
    """Linear CR ramp after ``delay_steps``: ``CR(step) = start + (end - start) * clip((step - delay) /
    ramp_steps, 0, 1)``.

    With ``context > 0`` the CRs are **memory** CRs at ``context`` tokens (tokens seen / held, the
    always-kept window included) and ``target_fraction`` converts them to the eviction rate the
    compression loss asks of the decisions; with ``context = 0`` they are decision-rate CRs.
    """

    end_cr: float
    ramp_steps: int
    start_cr: float = 1.0
    delay_steps: int = 0
    context: int = 0
    window: int = 0

    def __post_init__(self) -> None:
        require_cr("start_cr", self.start_cr)
        require_cr("end_cr", self.end_cr)
        require_non_negative_int("ramp_steps", self.ramp_steps)
        require_non_negative_int("delay_steps", self.delay_steps)
        require_non_negative_int("context", self.context)
        require_non_negative_int("window", self.window)
        if self.context:
            decision_cr_for_memory(self.end_cr, self.context, self.window)  # reachable, or a clear error

    def cr(self, step: int) -> float:
        require_non_negative_int("step", step)
        if step < self.delay_steps:
            return self.start_cr
        if self.ramp_steps == 0:
            return self.end_cr
        progress = min((step - self.delay_steps) / self.ramp_steps, 1.0)
        return self.start_cr + (self.end_cr - self.start_cr) * progress

    def decision_cr(self, step: int) -> float:
        """The decision-rate CR the compression loss targets at ``step``."""
        cr = self.cr(step)
        return decision_cr_for_memory(cr, self.context, self.window) if self.context else cr

    def target_fraction(self, step: int) -> float:
        return target_fraction(self.decision_cr(step))


# ----------------------------------------------------------------------------- distillation


def _math_dtype(z: torch.Tensor) -> torch.dtype:
    return torch.promote_types(z.dtype, torch.float32)  # fp32 for bf16/fp16/fp32, fp64 stays fp64


def _log_softmax_stats(z: torch.Tensor, tau: float, chunk: int, group=None) -> torch.Tensor:
    """Row-wise logsumexp of z / tau (>= fp32), one vocab chunk at a time. ``z [N, V] -> [N]``.

    With a process ``group`` the vocabulary is sharded over its ranks: the result is the logsumexp over
    the whole vocabulary, identical on every rank.
    """
    dt = _math_dtype(z)
    lse = torch.full((z.shape[0],), float("-inf"), dtype=dt, device=z.device)
    for s in range(0, z.shape[1], chunk):
        lse = torch.logaddexp(lse, torch.logsumexp(z[:, s : s + chunk].to(dt) / tau, dim=-1))
    return allreduce_logsumexp(lse, group)


def allreduce_logsumexp(lse: torch.Tensor, group=None) -> torch.Tensor:
    """The logsumexp over the whole vocabulary from each rank's logsumexp over its shard ``[N]`` (the
    same on every rank of ``group``; ``lse`` itself without a group)."""
    if group is None:
        return lse
    peak = lse.clone()
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX, group=group)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.exp(lse - peak)
    torch.distributed.all_reduce(total, group=group)
    return peak + torch.log(total)


class _TokenKL(torch.autograd.Function):
    """Per-token KL between two next-token distributions; gradient to the student only.

    Forward and backward walk the vocabulary in chunks, so peak extra memory is O(N * chunk) fp32
    instead of several full [N, V] fp32 copies. With a process ``group`` (vocabulary sharded over
    tensor-parallel ranks) the forward all-reduces the two normalisers and the KL, so every rank holds
    the whole-vocabulary KL; the backward needs no communication: the gradient of a shard's logits
    depends on the other shards only through those normalisers and the KL, which every rank holds.
    """

    @staticmethod
    def forward(ctx, zs, zt, tau, reverse, chunk, group):  # type: ignore[override]
        lse_s = _log_softmax_stats(zs, tau, chunk, group)
        lse_t = _log_softmax_stats(zt, tau, chunk, group)
        dt = _math_dtype(zs)
        kl = torch.zeros(zs.shape[0], dtype=dt, device=zs.device)
        for s in range(0, zs.shape[1], chunk):
            ls = zs[:, s : s + chunk].to(dt) / tau - lse_s[:, None]
            lt = zt[:, s : s + chunk].to(dt) / tau - lse_t[:, None]
            if reverse:  # KL(T || S)
                kl += (lt.exp() * (lt - ls)).sum(-1)
            else:  # KL(S || T)
                kl += (ls.exp() * (ls - lt)).sum(-1)
        if group is not None:
            torch.distributed.all_reduce(kl, group=group)
        ctx.save_for_backward(zs, zt, lse_s, lse_t, kl)
        ctx.tau, ctx.reverse, ctx.chunk = tau, reverse, chunk
        return kl

    @staticmethod
    def backward(ctx, grad_kl):  # type: ignore[override]
        zs, zt, lse_s, lse_t, kl = ctx.saved_tensors
        tau, chunk = ctx.tau, ctx.chunk
        grad = torch.empty_like(zs)
        dt = kl.dtype
        w = grad_kl.to(dt)[:, None] / tau
        for s in range(0, zs.shape[1], chunk):
            ls = zs[:, s : s + chunk].to(dt) / tau - lse_s[:, None]
            ps = ls.exp()
            lt = zt[:, s : s + chunk].to(dt) / tau - lse_t[:, None]
            g = ps - lt.exp() if ctx.reverse else ps * (ls - lt - kl[:, None])
            grad[:, s : s + chunk] = (g * w).to(zs.dtype)
        return grad, None, None, None, None, None


def token_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    direction: KLDirection = "student_teacher",
    temperature: float = 1.0,
    vocab_chunk: int = 16384,
    group=None,
) -> torch.Tensor:
    """Per-token KL with the leading shape of the logits, computed in fp32 (fp64 for fp64 inputs).

    ``direction="student_teacher"``: KL(S || T), what NVIDIA's DMS reference trains with (it calls it
    "forward KL"). ``"teacher_student"``: KL(T || S), the standard distillation direction. The teacher
    never receives a gradient. ``group``: a process group whose ranks each hold one vocabulary shard
    of the logits (tensor parallelism); the result is then the whole-vocabulary KL on every rank.
    """
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        require_tensor(name, x)
        require_float(name, x)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)} (a vocabulary mismatch?)"
        )
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"direction must be one of {KL_DIRECTIONS}, got {direction!r}")
    require_positive("temperature", temperature)
    if vocab_chunk <= 0:
        raise ValueError(f"vocab_chunk must be positive, got {vocab_chunk}")
    lead = student_logits.shape[:-1]
    V = student_logits.shape[-1]
    zs = student_logits.reshape(-1, V)
    zt = teacher_logits.detach().reshape(-1, V)
    if group is not None and torch.distributed.get_world_size(group) == 1:
        group = None
    kl = _TokenKL.apply(zs, zt, float(temperature), direction == "teacher_student", int(vocab_chunk), group)
    return kl.view(lead)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    direction: KLDirection = "student_teacher",
    temperature: float = 1.0,
    vocab_chunk: int = 16384,
) -> torch.Tensor:
    """Mean per-token KL over the tokens where ``mask`` is set (0 if no token is set)."""
    return masked_token_mean(
        token_kl(student_logits, teacher_logits, direction, temperature, vocab_chunk), mask
    )


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-token ``values`` over the tokens where ``mask`` is set (0 if none is set)."""
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ValueError(
            f"mask must have the logits' leading shape {tuple(values.shape)}, got {tuple(mask.shape)}"
        )
    w = mask.to(values.dtype)
    return (values * w).sum() / w.sum().clamp(min=1.0)


def kd_token_mask(
    input_ids: torch.Tensor, eos_token_id: int | Sequence[int] | None, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """KD mask ``[B, T]``: drop padding and positions whose *input* token ends a document."""
    require_tensor("input_ids", input_ids)
    if input_ids.is_floating_point():
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    if eos_token_id is not None:
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        mask &= ~torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
    if valid is not None:
        if valid.shape != input_ids.shape:
            raise ValueError(f"valid must match input_ids {tuple(input_ids.shape)}, got {tuple(valid.shape)}")
        mask &= valid.bool()
    return mask
