"""Pure DMS math on plain tensors (torch only): gating, noise, shift, reference attention, losses.

Nothing here imports megatron, hydra, wandb or transformers; ``tests/unit/test_layering.py``
checks this in a fresh interpreter.
"""

from dms_megatron.core.attention import dms_attention_reference
from dms_megatron.core.gating import (
    DEFAULT_LOGIT_OFFSET,
    DEFAULT_LOGIT_SCALE,
    Decisions,
    EvictionAdapter,
    hard_decisions,
    neuron_evict_logits,
    per_layer_logits,
    relaxed_decisions,
    teacher_decisions,
    zero_neuron,
)
from dms_megatron.core.losses import (
    KL_DIRECTIONS,
    CRSchedule,
    KLDirection,
    compression_hinge,
    compression_loss,
    decision_cr_for_memory,
    decision_sums,
    distillation_loss,
    kd_token_mask,
    masked_token_mean,
    max_memory_cr,
    memory_cr,
    target_fraction,
    token_kl,
)
from dms_megatron.core.noise import NoiseKey, logistic_noise, uniform_from_hash
from dms_megatron.core.shift import (
    check_doc_ids,
    doc_ids_from_cu_seqlens,
    same_doc_as_next,
    shift_to_previous_token,
    shifted_log_keep,
)

__all__ = [
    "DEFAULT_LOGIT_OFFSET",
    "DEFAULT_LOGIT_SCALE",
    "KL_DIRECTIONS",
    "CRSchedule",
    "Decisions",
    "EvictionAdapter",
    "KLDirection",
    "NoiseKey",
    "check_doc_ids",
    "compression_hinge",
    "compression_loss",
    "decision_cr_for_memory",
    "decision_sums",
    "distillation_loss",
    "dms_attention_reference",
    "doc_ids_from_cu_seqlens",
    "hard_decisions",
    "kd_token_mask",
    "logistic_noise",
    "masked_token_mean",
    "max_memory_cr",
    "memory_cr",
    "neuron_evict_logits",
    "per_layer_logits",
    "relaxed_decisions",
    "same_doc_as_next",
    "shift_to_previous_token",
    "shifted_log_keep",
    "target_fraction",
    "teacher_decisions",
    "token_kl",
    "uniform_from_hash",
    "zero_neuron",
]
