"""Dataclass schema for DMS knobs, validated in ``__post_init__`` (no Hydra, no side effects).

Every error is a ``ValueError`` naming the key, the bad value and what would be valid, so a bad
Hydra override fails before any model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from dms_megatron.core.gating import DEFAULT_LOGIT_OFFSET, DEFAULT_LOGIT_SCALE
from dms_megatron.core.losses import KL_DIRECTIONS, CRSchedule

Variant = Literal["neuron", "adapter"]
DecisionsPer = Literal["head", "layer"]
CompressionLossForm = Literal["global", "per_layer"]
AttentionBackend = Literal["auto", "reference", "flex"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "variant": ("neuron", "adapter"),
    "decisions_per": ("head", "layer"),
    "kl_direction": KL_DIRECTIONS,
    "compression_loss": ("global", "per_layer"),
    "attention_backend": ("auto", "reference", "flex"),
}


def _fail(key: str, value: object, want: str) -> None:
    raise ValueError(f"dms.{key}={value!r} is invalid: {want}")


@dataclass
class DMSConfig:
    """DMS settings of one model (dms_algorithm.md; defaults follow the paper unless noted).

    variant: ``neuron`` repurposes q channel D-1 of each KV group's first head (paper, no new
        parameters); ``adapter`` adds RMSNorm + zero-initialised Linear(d -> Hkv) per layer on the
        pre-norm residual (NVIDIA's released recipe).
    decisions_per: one decision stream per KV ``head`` or per ``layer`` (head 0 broadcast).
    window: keys stay unconditionally visible to the ``window + 1`` queries k..k+window.
    logit_scale, logit_offset: ``l = scale * raw - offset``.
    tau: temperature of the training relaxation.
    seed: noise seed (noise is a pure function of seed, step, micro-batch, DP rank, layer).
    teacher_mode: eviction off (decisions 0, log-keep 0): the module computes the original model
        (exactly for ``adapter``; for ``neuron`` with the repurposed channel still zeroed).
    train_noise: add logistic noise to the logits in training (off: deterministic relaxation).
    kl_direction: ``student_teacher`` = KL(S||T) (default, NVIDIA's reference) or
        ``teacher_student`` = KL(T||S) (standard KD).
    compression_loss: ``global`` (exact all-layer hinge per sample, the paper's objective, under any
        PP size) or ``per_layer`` (stricter: mean of per-layer hinges).
    compression_weight: lambda in ``L = L_KD + lambda * L_cmp``.
    cr_start, cr_end, cr_ramp_steps: linear CR ramp (paper pace: ~100 steps per CR unit).
    attention_backend: ``reference`` (dense chunked, CPU and oracle), ``flex`` (FlexAttention,
        CUDA), ``auto`` (flex on CUDA tensors, reference otherwise).
    """

    variant: Variant = "neuron"
    decisions_per: DecisionsPer = "head"
    window: int = 256
    logit_scale: float = DEFAULT_LOGIT_SCALE
    logit_offset: float = DEFAULT_LOGIT_OFFSET
    tau: float = 0.1
    seed: int = 1234
    teacher_mode: bool = False
    train_noise: bool = True
    adapter_bias: bool = False
    adapter_eps: float = 1e-6
    kl_direction: str = "student_teacher"
    kl_temperature: float = 1.0
    compression_loss: CompressionLossForm = "global"
    compression_weight: float = 1.0
    cr_start: float = 1.0
    cr_end: float = 8.0
    cr_ramp_steps: int = 700
    attention_backend: AttentionBackend = "auto"

    def __post_init__(self) -> None:
        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                _fail(key, getattr(self, key), f"choose one of {', '.join(choices)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                _fail(f.name, value, "expected an integer")
            if f.type == "float" and (isinstance(value, bool) or not isinstance(value, int | float)):
                _fail(f.name, value, "expected a number")
            if f.type == "bool" and not isinstance(value, bool):
                _fail(f.name, value, "expected true or false")
        if self.window < 0:
            _fail("window", self.window, "must be >= 0 (the paper uses 256, NVIDIA's checkpoint 512)")
        if self.tau <= 0:
            _fail("tau", self.tau, "must be > 0 (the paper uses 0.1)")
        if self.logit_scale <= 0:
            _fail("logit_scale", self.logit_scale, "must be > 0 (default 100)")
        if self.adapter_eps <= 0:
            _fail("adapter_eps", self.adapter_eps, "must be > 0")
        if self.kl_temperature <= 0:
            _fail("kl_temperature", self.kl_temperature, "must be > 0")
        if self.compression_weight < 0:
            _fail("compression_weight", self.compression_weight, "must be >= 0")
        if self.seed < 0:
            _fail("seed", self.seed, "must be >= 0")
        if self.cr_start < 1:
            _fail("cr_start", self.cr_start, "a compression ratio must be >= 1")
        if self.cr_end < self.cr_start:
            _fail("cr_end", self.cr_end, f"must be >= cr_start ({self.cr_start})")
        if self.cr_ramp_steps < 0:
            _fail("cr_ramp_steps", self.cr_ramp_steps, "must be >= 0 (0 = target CR from step 0)")

    @property
    def schedule(self) -> CRSchedule:
        return CRSchedule(
            end_cr=float(self.cr_end), ramp_steps=self.cr_ramp_steps, start_cr=float(self.cr_start)
        )
