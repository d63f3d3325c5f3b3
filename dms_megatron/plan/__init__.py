"""Memory and throughput planner for a retrofit run: pure arithmetic on ``ModelArch`` (no torch,
megatron or Hydra). ``launch/plan.py`` is its CLI; docs/cluster.md shows it on the 32B preset.
Modules: ``inputs`` (layout, assumptions), ``memory`` (parameters, activations, stage peaks),
``step_time`` (FLOPs, step estimate), ``report`` (plan, suggestions, config mapping, text report).

What one GPU holds, per pipeline stage (bytes; ``e`` = 2 for bf16/fp16 models, 4 for fp32):

* student parameters ``e * P``; gradients ``4 * P_train`` (megatron DDP with ``grad_reduce_in_fp32``:
  a full fp32 ``main_grad`` buffer, not sharded); distributed-optimizer shard
  ``(4 + 8) * P_train / dp`` (fp32 master copy + Adam m and v; no master copy for fp32 models);
  separate teacher ``e * P_teacher`` (frozen, same TP/PP sharding; none for the self-teacher).
* activations: ``tokens * layers * per_layer * in_flight`` where ``tokens = micro_batch * seq`` and
  stage ``i`` of a 1F1B pipeline keeps ``min(pp - i, m)`` micro-batches alive (``m`` micro-batches
  per step). ``per_layer`` follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in
  Large Transformer Models": ``s*b*h*(34 + 5*a*s/h)`` bytes for GPT with GeLU, dropout and
  materialised attention scores), re-derived for *our* layer by listing the tensors autograd saves
  (``layer_activation_terms``): RMSNorm, GQA, SwiGLU, no dropout, FlexAttention (no ``s^2`` term:
  scores are never stored, only a fp32 log-sum-exp per query head) and the DMS decision tensors.
* last stage: LM-head inputs plus the loss's peak: student and teacher logits ``[tokens, V/tp]`` in
  the model dtype and ``kl_fp32_buffers`` fp32 buffers of that shape (``megatron/kd.py``: log-softmax,
  its exp, teacher log-probs, probabilities, difference, product).
* pipeline P2P buffers ``[s(/tp), b, 2h + 2]`` (student hidden, two decision channels, teacher
  hidden) per micro-batch in flight, and a backward working set of ``working_layers`` layers.
* on top of the allocator's peak (what ``torch.cuda.max_memory_allocated`` reports): a fragmentation
  fraction and a fixed runtime reserve (CUDA context, NCCL buffers) -- named assumptions.

Step time: FLOPs per token as ``dms_megatron.training.metrics`` counts them (student forward +
backward = 3x forward, teacher forward = 1x; attention ``2 * q * (s + 1)`` per layer and token, i.e.
``4 s^2 q`` halved for causal), matmuls at ``matmul_efficiency`` and attention at
``attention_efficiency`` of the bf16 dense peak, plus TP collectives (not overlapped with the local
spec), the KD loss as ``kd_bytes_per_logit`` of memory traffic per logit (last stage), times the
pipeline's ``(m + pp - 1)`` slots, plus the DP gradient reduce-scatter and parameter all-gather
(``overlap_grad_reduce=False`` in ``training/setup.py``) and the optimizer step as
``optimizer_bytes_per_param`` of memory traffic per trainable parameter.
"""

from __future__ import annotations

from dms_megatron.plan.inputs import (
    DTYPE_BYTES,
    FP32,
    GIB,
    NORMS,
    RECOMPUTE,
    Assumptions,
    PlanInput,
)
from dms_megatron.plan.memory import (
    StageMemory,
    StageParams,
    korthikanti_layer_bytes,
    layer_activation_bytes,
    layer_activation_terms,
    stage_memory,
    stage_params,
    total_params,
)
from dms_megatron.plan.report import (
    Plan,
    Suggestion,
    format_plan,
    make_plan,
    plan_input_from_config,
    suggest,
)
from dms_megatron.plan.step_time import (
    StepEstimate,
    forward_flops_per_token,
    model_flops_per_token,
    step_estimate,
)

__all__ = [
    "DTYPE_BYTES",
    "FP32",
    "GIB",
    "NORMS",
    "RECOMPUTE",
    "Assumptions",
    "Plan",
    "PlanInput",
    "StageMemory",
    "StageParams",
    "StepEstimate",
    "Suggestion",
    "format_plan",
    "forward_flops_per_token",
    "korthikanti_layer_bytes",
    "layer_activation_bytes",
    "layer_activation_terms",
    "make_plan",
    "model_flops_per_token",
    "plan_input_from_config",
    "stage_memory",
    "stage_params",
    "step_estimate",
    "suggest",
    "total_params",
]
