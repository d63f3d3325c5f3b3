"""Dataclass schema for DMS knobs, validated in ``__post_init__`` (no Hydra, no side effects).

Every error is a ``ValueError`` naming the key, the bad value and what would be valid, so a bad
Hydra override fails before any model is built.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Literal

from dms_megatron.core.dms_rules import (
    DEFAULT_ADAPTER_EPS,
    DEFAULT_LOGIT_OFFSET,
    DEFAULT_LOGIT_SCALE,
    DMSBlock,
)
from dms_megatron.core.losses import KL_DIRECTIONS, CRSchedule, decision_cr_for_memory
from dms_megatron.runtime import TORCH_DTYPES

Variant = Literal["neuron", "adapter"]
DecisionsPer = Literal["head", "layer"]
CompressionLossForm = Literal["global", "per_layer"]
AttentionBackend = Literal["auto", "reference", "flex", "triton", "split"]
KDBackend = Literal["auto", "torch", "triton"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "variant": ("neuron", "adapter"),
    "decisions_per": ("head", "layer"),
    "kl_direction": KL_DIRECTIONS,
    "compression_loss": ("global", "per_layer"),
    "attention_backend": ("auto", "reference", "flex", "triton", "split"),
    "kd_backend": ("auto", "torch", "triton"),
}


def _fail(key: str, value: object, want: str) -> None:
    raise ValueError(f"dms.{key}={value!r} is invalid: {want}")


@dataclass
class DMSConfig:
    """DMS settings of one model (docs/dms.md; defaults follow the paper unless noted).

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
    cr_start, target_cr, cr_ramp_steps: linear CR ramp (paper pace: ~100 steps per CR unit).
    cr_context: the CRs are **memory** CRs (tokens seen / tokens held over all layers and KV heads, the
        always-kept window included) at this many tokens; the compression loss asks the decisions for
        the eviction rate that yields it (``core.losses.decision_cr_for_memory``). 0: the CRs are
        decision rates (1 / kept fraction of decisions), the paper's convention.
    neuron_fade_steps: neuron variant only: for this many steps the repurposed q channel is faded out
        of attention linearly (the student starts equal to the teacher) with eviction off; then its q
        rows are zeroed, so every logit starts at ``-logit_offset`` like the adapter's, and the CR ramp
        begins. 0: the paper's start (channel removed and read as a logit from step 0).
    attention_backend: ``reference`` (dense chunked, CPU and oracle), ``flex`` (FlexAttention,
        CUDA), ``triton`` (the fused Triton kernel, CUDA; opt-in: on an H100 1.4-1.7x SDPA forward +
        backward against flex's 2.0-2.7x, but its retrofit loss curve is not yet shown within flex's
        run-to-run spread), ``split`` (cuDNN over the keys older than the window + FlashAttention-2's sliding
        window, merged by log-sum-exp; packed documents through FA2's variable-length form; CUDA;
        opt-in: correct on an H100 but 2.4-11x SDPA), ``auto`` (flex on CUDA tensors, reference
        otherwise).
    kd_backend: the KL distillation loss: ``torch`` (``core.losses.token_kl``, vocabulary chunks),
        ``triton`` (``kernels.kd``: three row-streaming kernels, CUDA) or ``auto`` (triton on CUDA
        logits, torch otherwise; timed on an H100 the Triton loss cut the KD loss's kernels, forward +
        backward, from 16.1 to 0.8 ms at one TP=8 rank of the 32B layer and from 81.8 to 3.9 ms on
        SmolLM2).
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
    adapter_eps: float = DEFAULT_ADAPTER_EPS
    kl_direction: str = "student_teacher"
    kl_temperature: float = 1.0
    compression_loss: CompressionLossForm = "global"
    compression_weight: float = 1.0
    cr_start: float = 1.0
    target_cr: float = 8.0
    cr_ramp_steps: int = 700
    cr_context: int = 8192
    neuron_fade_steps: int = 50
    attention_backend: AttentionBackend = "auto"
    kd_backend: KDBackend = "auto"

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
        if self.target_cr < self.cr_start:
            _fail("target_cr", self.target_cr, f"must be >= cr_start ({self.cr_start})")
        if self.cr_ramp_steps < 0:
            _fail("cr_ramp_steps", self.cr_ramp_steps, "must be >= 0 (0 = target CR from step 0)")
        if self.cr_context < 0:
            _fail("cr_context", self.cr_context, "must be >= 0 (0: target_cr is a decision rate)")
        if self.neuron_fade_steps < 0:
            _fail("neuron_fade_steps", self.neuron_fade_steps, "must be >= 0 (0: no fade)")
        if self.cr_context:
            try:
                decision_cr_for_memory(float(self.target_cr), self.cr_context, self.window)
            except ValueError as e:
                _fail("target_cr", self.target_cr, str(e))

    @property
    def fade_steps(self) -> int:
        """Steps of the neuron variant's channel fade (0 for the adapter)."""
        return self.neuron_fade_steps if self.variant == "neuron" else 0

    @property
    def schedule(self) -> CRSchedule:
        return CRSchedule(
            end_cr=float(self.target_cr),
            ramp_steps=self.cr_ramp_steps,
            start_cr=float(self.cr_start),
            delay_steps=self.fade_steps,
            context=self.cr_context,
            window=self.window,
        )

    def exported_block(self, trained_cr: float | None = None) -> DMSBlock:
        """The ``dms`` block export writes into ``config.json`` (``core.dms_rules.DMSBlock``): every block
        field but ``trained_cr`` is a field of this config."""
        if self.adapter_bias:
            raise ValueError(
                "dms.adapter_bias=true cannot be exported: the exported adapter (NVIDIA's "
                "self_attn.dms_proj_alpha) has no bias. Retrofit with dms.adapter_bias=false to export."
            )
        shared = {f.name: getattr(self, f.name) for f in fields(DMSBlock) if f.name != "trained_cr"}
        shared["cr_context"] = self.cr_context or None  # None: the CRs are decision rates
        return DMSBlock(**shared, trained_cr=trained_cr)


# ----------------------------------------------------------------------------- the retrofit run


def _positive_int(section: str, key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{section}.{key}={value!r} is invalid: expected an integer >= 1")


@dataclass
class ModelConfig:
    """A model preset (``configs/model/<name>.yaml``): the HF config plus where the weights are."""

    name: str = "smollm2_135m"
    hf_path: str | None = None  # HF folder with the teacher's weights
    hf_config: dict = field(default_factory=dict)  # the HF config.json fields (see dms_megatron.families)
    checkpoint: str | None = None  # an imported Megatron checkpoint (launch/convert.py import)
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} is invalid: choose bf16, fp16 or fp32")
        if not self.hf_config:
            raise ValueError("model.hf_config is empty: pick a preset with model=<name> (configs/model/)")
        from dms_megatron.families import arch_from_hf_config

        arch_from_hf_config(self.hf_config)  # unknown architecture etc. fail here


RECOMPUTE_CHOICES = ("none", "selective", "full")


@dataclass
class ParallelConfig:
    """Layout and activation recompute (``selective``: megatron's core-attention checkpoint; ``full``:
    every layer recomputed in backward, keeping only its input; see docs/cluster.md)."""

    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    global_batch_size: int = 8
    recompute: str = "none"  # activation recompute: none | selective (core attention) | full (every layer)

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "micro_batch_size", "global_batch_size"):
            _positive_int("parallel", key, getattr(self, key))
        if self.recompute not in RECOMPUTE_CHOICES:
            choices = ", ".join(RECOMPUTE_CHOICES)
            raise ValueError(f"parallel.recompute={self.recompute!r} is invalid: choose one of {choices}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"parallel.global_batch_size={self.global_batch_size} is not a multiple of "
                f"parallel.micro_batch_size={self.micro_batch_size}"
            )
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tp > 1")


@dataclass
class DataConfig:
    prefixes: list = field(default_factory=list)  # indexed datasets (launch/preprocess.py output prefixes)
    weights: list | None = None  # blend weights, one per prefix
    seq_length: int = 2048

    def __post_init__(self) -> None:
        _positive_int("data", "seq_length", self.seq_length)
        if self.weights is not None and len(self.weights) != len(self.prefixes):
            raise ValueError(
                f"data.weights has {len(self.weights)} entries for {len(self.prefixes)} data.prefixes"
            )
        if self.weights is not None and any(w <= 0 for w in self.weights):
            raise ValueError(f"data.weights={self.weights} must all be > 0")


@dataclass
class TrainConfig:
    """mode: ``full`` trains every weight against a separate frozen teacher (the paper); ``adapter``
    trains only the DMS adapters, the teacher being the student with eviction off (NVIDIA's recipe).
    ``adapter_lr_mult``: the adapters' learning rate is ``lr`` (and ``min_lr``) times this, so a full run
    can move the eviction adapters fast and the base weights slowly (1: one rate for every weight).
    ``on_nonfinite``: a step whose loss or gradients hold NaN/Inf is ``skip``-ped (no update, logged with
    the step and micro-batches) or ``stop``-s the run; ``max_nonfinite_skips`` consecutive skips stop it
    too (the last checkpoint is the last good state). ``teacher_cuda_graph``: replay the separate
    teacher's forward as CUDA graphs (megatron/teacher_graph.py; for small models, whose step is
    host-bound; needs train.mode=full, dms.attention_backend=triton and parallel.tp=1)."""

    steps: int = 1000
    mode: str = "full"
    lr: float = 3e-5
    min_lr: float = 3e-6
    adapter_lr_mult: float = 1.0
    warmup_steps: int = 20
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    seed: int = 1234
    save_interval: int = 100
    keep_last: int = 2
    resume: str = "auto"  # auto | none | <checkpoint folder>
    on_nonfinite: str = "skip"  # skip | stop
    max_nonfinite_skips: int = 5
    teacher_cuda_graph: bool = False

    def __post_init__(self) -> None:
        for key in ("steps", "save_interval", "keep_last", "max_nonfinite_skips"):
            _positive_int("train", key, getattr(self, key))
        if self.mode not in ("full", "adapter"):
            raise ValueError(f"train.mode={self.mode!r} is invalid: choose full or adapter")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(
                f"train.lr={self.lr} / train.min_lr={self.min_lr}: need lr > 0 and 0 <= min_lr <= lr"
            )
        if (
            isinstance(self.warmup_steps, bool)
            or not isinstance(self.warmup_steps, int)
            or self.warmup_steps < 0
        ):
            raise ValueError(f"train.warmup_steps={self.warmup_steps!r} must be an integer >= 0")
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError("train.weight_decay and train.clip_grad must be >= 0 (clip_grad 0 = off)")
        if not self.adapter_lr_mult > 0:
            raise ValueError(f"train.adapter_lr_mult={self.adapter_lr_mult} must be > 0")
        if self.on_nonfinite not in ("skip", "stop"):
            raise ValueError(f"train.on_nonfinite={self.on_nonfinite!r} is invalid: choose skip or stop")


@dataclass
class LoggingConfig:
    wandb_project: str | None = None  # None: JSONL and console only
    run_name: str | None = None
    group: str | None = None
    log_interval: int = 1
    heatmap_interval: int = 50
    console: bool = True

    def __post_init__(self) -> None:
        _positive_int("logging", "log_interval", self.log_interval)
        _positive_int("logging", "heatmap_interval", self.heatmap_interval)


@dataclass
class RetrofitConfig:
    """Everything a retrofit run needs; built from Hydra's composed config by ``from_dict``."""

    model: ModelConfig
    dms: DMSConfig = field(default_factory=DMSConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_dir: str = "runs/retrofit"

    def __post_init__(self) -> None:
        if self.train.mode == "adapter" and self.dms.variant != "adapter":
            raise ValueError(
                "train.mode=adapter trains only the DMS adapters, but dms.variant="
                f"{self.dms.variant!r} has none: set dms.variant=adapter or train.mode=full"
            )
        if self.dms.cr_ramp_steps > self.train.steps:
            raise ValueError(
                f"dms.cr_ramp_steps={self.dms.cr_ramp_steps} is invalid with train.steps={self.train.steps}: "
                "the CR ramp would end after the run, which would never reach dms.target_cr; lower "
                "dms.cr_ramp_steps or raise train.steps"
            )
        if self.dms.window >= self.data.seq_length:
            raise ValueError(
                f"dms.window={self.dms.window} is invalid with data.seq_length={self.data.seq_length}: every "
                "key stays inside the window, so no token can ever be evicted; lower dms.window below "
                "data.seq_length or raise data.seq_length"
            )
        if self.train.teacher_cuda_graph:
            self._check_teacher_graph()
        from dms_megatron.families import arch_from_hf_config

        arch_from_hf_config(self.model.hf_config).check_parallel(self.parallel.tp, self.parallel.pp)

    def _check_teacher_graph(self) -> None:
        needs = {
            "train.mode=full (a separate teacher; the adapter recipe's teacher is the student)": (
                self.train.mode == "full"
            ),
            "dms.attention_backend=triton (its document bounds need no host sync while capturing)": (
                self.dms.attention_backend == "triton"
            ),
            "parallel.tp=1 (no collectives inside the graph)": self.parallel.tp == 1,
        }
        missing = [need for need, ok in needs.items() if not ok]
        if missing:
            raise ValueError("train.teacher_cuda_graph=true needs " + "; ".join(missing))

    def check_world_size(self, world_size: int) -> None:
        """Refuse a process count the layout cannot use: it must be a multiple of TP x PP, and the global
        batch a multiple of micro batch x DP."""
        p = self.parallel
        if world_size < 1 or world_size % (p.tp * p.pp):
            raise ValueError(
                f"world size {world_size} is not a multiple of parallel.tp x parallel.pp = {p.tp} x {p.pp} = "
                f"{p.tp * p.pp}: use a multiple of {p.tp * p.pp} GPUs (e.g. change the node count) or "
                "another layout"
            )
        dp = world_size // (p.tp * p.pp)
        if p.global_batch_size % (p.micro_batch_size * dp):
            raise ValueError(
                f"parallel.global_batch_size={p.global_batch_size} is not a multiple of "
                f"parallel.micro_batch_size x DP = {p.micro_batch_size} x {dp} at world size {world_size}: "
                "change the global batch or the number of GPUs"
            )

    @classmethod
    def from_dict(cls, cfg: dict) -> RetrofitConfig:
        """Nested dict (e.g. ``OmegaConf.to_container(cfg, resolve=True)``) -> validated config.
        Unknown keys fail with their full name."""
        sections = {
            "model": ModelConfig,
            "dms": DMSConfig,
            "parallel": ParallelConfig,
            "data": DataConfig,
            "train": TrainConfig,
            "logging": LoggingConfig,
        }
        unknown = set(cfg) - set(sections) - {"run_dir"}
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        built = {}
        for name, kind in sections.items():
            values = dict(cfg.get(name) or {})
            allowed = {f.name for f in fields(kind)}
            extra = sorted(set(values) - allowed)
            if extra:
                raise ValueError(f"unknown config keys: {[f'{name}.{k}' for k in extra]}")
            built[name] = kind(**values)
        return cls(**built, run_dir=str(cfg.get("run_dir", "runs/retrofit")))


# ----------------------------------------------------------------------------- Hydra group defaults


def _yaml_scalar(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:  # YAML 1.1 reads 3e-05 as a string; 3.0e-05 is a float
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
    return str(value)


def defaults_yaml(cls: type) -> str:
    """The Hydra group file of a config section: every field with its dataclass default. Generated
    (``scripts/config_defaults.py``), so the dataclass stays the single source of defaults."""
    lines = [
        f"# Generated from dms_megatron.config.{cls.__name__} (its docstring explains each key): edit the",
        "# dataclass, then run `python scripts/config_defaults.py`. Presets override in configs/experiment/.",
    ]
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"{f.name}: {_yaml_scalar(default)}")
    return "\n".join(lines) + "\n"


# group file (relative to configs/) -> the section whose defaults it holds
GROUP_DEFAULT_FILES: dict[str, type] = {
    "dms/default.yaml": DMSConfig,
    "train/default.yaml": TrainConfig,
    "parallel/single.yaml": ParallelConfig,
    "data/none.yaml": DataConfig,
    "logging/default.yaml": LoggingConfig,
}
