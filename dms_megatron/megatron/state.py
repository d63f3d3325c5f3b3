"""Per-run mutable DMS state shared by the layers of one model, and the exact global compression
loss across pipeline stages.

``DMSRunState`` is created by ``apply_dms`` and handed to every DMS module through the spec; the
training loop sets ``step`` / ``micro_batch`` / ``target_fraction`` before each micro-batch.

Exact global compression loss under pipeline parallelism (docs/dms.md section 5)
-----------------------------------------------------------------------------------
The hinge ``relu(target - frac_b)`` couples all layers of a sample, which live on different stages.
We carry a per-position *decision count* ``acc [s(/tp), b]`` (sum of hard decisions over the layers
seen so far and over all KV heads) as one extra channel of the pipeline's activation tensor
(``[s, b, h] -> [s, b, h + 1]``). The last stage turns it into the exact loss, and autograd sends
``d loss / d acc`` back through the ordinary pipeline gradient. Inside a stage the layers do not
thread ``acc`` through their forward (Megatron's blocks and recompute wrappers pass hidden states
only); instead:

* each layer adds its count to ``DecisionAccumulator.values`` (forward value) and attaches an
  ``_InjectDecisionGrad`` node to its attention output, whose backward hands the layer's
  decisions the gradient ``grad_acc`` (the count enters ``acc`` with coefficient 1);
* the stage output node (``_StageOutput``) produces ``acc_out = acc_in + sum(values)`` and, in
  backward, stores ``grad_acc`` before returning the hidden-state gradient, so every injector
  (upstream of the hidden states) runs after it. This also holds with activation recompute: the
  recomputed injector runs inside the backward of the same micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class DecisionAccumulator:
    """Per-position decision counts of one model chunk for the micro-batch in flight."""

    def __init__(self) -> None:
        self.open = False  # True between the chunk's forward start and its output
        self.values: list[torch.Tensor] = []
        self.grad: torch.Tensor | None = None
        self.acc_in: torch.Tensor | None = None  # received from the previous stage (with grad)
        self.total: torch.Tensor | None = None  # last stage: acc over all layers (with grad)

    def begin(self) -> None:
        self.open, self.values, self.total = True, [], None

    def add(self, carrier: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Record a layer's per-position count; return ``carrier`` wired to receive its gradient."""
        if not self.open:  # recompute during backward: the value was recorded in the first pass
            return _InjectDecisionGrad.apply(carrier, count, self) if count.requires_grad else carrier
        self.values.append(count.detach())
        if count.requires_grad and torch.is_grad_enabled():
            return _InjectDecisionGrad.apply(carrier, count, self)
        return carrier

    def summed(self, like: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(like.shape[:2], dtype=torch.float32, device=like.device)
        for v in self.values:
            total = total + v.float()
        return total


class _InjectDecisionGrad(torch.autograd.Function):
    """Identity on ``carrier``; gives ``count`` the gradient of the stage's decision channel."""

    @staticmethod
    def forward(ctx, carrier, count, acc):  # type: ignore[override]
        ctx.acc = acc
        ctx.count_shape, ctx.count_dtype = count.shape, count.dtype
        return carrier.view_as(carrier)

    @staticmethod
    def backward(ctx, grad_carrier):  # type: ignore[override]
        g = ctx.acc.grad
        if g is None:  # the loss did not use the decision channel (e.g. compression weight 0)
            g = torch.zeros(ctx.count_shape, dtype=ctx.count_dtype, device=grad_carrier.device)
        return grad_carrier, g.to(ctx.count_dtype).reshape(ctx.count_shape), None


class _StageOutput(torch.autograd.Function):
    """``(hidden, acc_in) -> (hidden, acc_in + layer counts)``; stores ``grad_acc`` first in backward."""

    @staticmethod
    def forward(ctx, hidden, acc_in, layer_counts, acc):  # type: ignore[override]
        ctx.acc = acc
        return hidden.view_as(hidden), acc_in + layer_counts

    @staticmethod
    def backward(ctx, grad_hidden, grad_acc):  # type: ignore[override]
        ctx.acc.grad = None if grad_acc is None else grad_acc.detach()
        return grad_hidden, grad_acc, None, None


def close_stage(hidden: torch.Tensor, acc: DecisionAccumulator) -> tuple[torch.Tensor, torch.Tensor]:
    """End of a model chunk's forward: returns ``(hidden, acc_out [s, b] fp32)``."""
    acc.open = False
    counts = acc.summed(hidden)
    acc_in = acc.acc_in if acc.acc_in is not None else torch.zeros_like(counts)
    acc.acc_in = None
    if torch.is_grad_enabled():
        return _StageOutput.apply(hidden, acc_in.float(), counts, acc)
    return hidden, acc_in.float() + counts


@dataclass
class DMSRunState:
    """What the training loop tells the DMS layers, plus what they report back.

    step, micro_batch: noise coordinates (with seed, DP rank and layer).
    teacher_pass: the modules run as the teacher (eviction off) for ``DistillationStage``'s self-teacher.
    target_fraction: compression target of the current step (1 - 1/CR).
    channel_keep: neuron variant: how much of the repurposed q channel attention still uses in training
        (1 -> 0 over ``dms.neuron_fade_steps``; eviction is off while it is > 0); 0 otherwise.
    accumulators: one ``DecisionAccumulator`` per model chunk (keyed by ``id`` of the block).
    stats: per-layer ``[Hkv_local]`` decision sums and counts recorded in this step (detached),
        reduced across TP/PP/DP once per step by ``metrics.reduce_decision_stats``.
    """

    step: int = 0
    micro_batch: int = 0
    target_fraction: float = 0.0
    channel_keep: float = 0.0
    teacher_pass: bool = False  # set while the student's modules compute the self-teacher (eviction off)
    accumulators: dict[int, DecisionAccumulator] = field(default_factory=dict)
    stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def record(self, layer: int, sums: torch.Tensor, counts: torch.Tensor) -> None:
        if layer in self.stats:
            s, c = self.stats[layer]
            self.stats[layer] = (s + sums, c + counts)
        else:
            self.stats[layer] = (sums, counts)

    def reset_stats(self) -> None:
        self.stats = {}
