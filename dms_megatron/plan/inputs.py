"""The planner's inputs: one retrofit layout (``PlanInput``) and the numbers it assumes (``Assumptions``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dms_megatron.families import ModelArch

GIB = 2**30
FP32 = 4
RECOMPUTE = ("none", "selective", "full")
NORMS = ("torch", "fused")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer >= 1")


@dataclass(frozen=True)
class PlanInput:
    """One retrofit layout. ``norm``: ``torch`` = our local spec's ``LocalNorm`` (``torch.nn.RMSNorm``
    with fp32 weights on bf16 inputs, so torch takes its composite path and saves fp32 copies; with or
    without sequence parallelism), ``fused`` = norms that save only their bf16 input and rstd (bf16 norm
    weights, or Transformer Engine's; neither is a trainer option yet)."""

    arch: ModelArch
    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: int = 2048
    sequence_parallel: bool = False
    recompute: str = "none"  # none | selective (core attention) | full (every layer)
    variant: str = "neuron"  # neuron | adapter
    train_mode: str = "full"  # full (all weights) | adapter (adapters only)
    teacher: str = "separate"  # separate (frozen copy) | self (the student with eviction off)
    adapter_bias: bool = False
    dtype: str = "bf16"
    norm: str = "torch"
    kd_backend: str = "triton"  # torch | triton (``dms.kd_backend``; ``auto`` is triton on GPUs)
    teacher_graph: bool = False  # the separate teacher's forward as CUDA graphs (train.teacher_cuda_graph)
    name: str = ""

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "dp", "micro_batch_size", "global_batch_size", "seq_length"):
            _positive(key, getattr(self, key))
        choices = {
            "recompute": RECOMPUTE,
            "variant": ("neuron", "adapter"),
            "train_mode": ("full", "adapter"),
            "teacher": ("separate", "self"),
            "dtype": tuple(DTYPE_BYTES),
            "norm": NORMS,
            "kd_backend": ("torch", "triton"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"{key}={getattr(self, key)!r} is invalid: choose one of {', '.join(allowed)}"
                )
        if self.teacher_graph and self.teacher != "separate":
            raise ValueError("teacher_graph replays a separate teacher's forward: it needs teacher=separate")
        if self.train_mode == "adapter" and self.variant != "adapter":
            raise ValueError("train_mode=adapter trains the DMS adapters: it needs variant=adapter")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel needs tp > 1")
        self.arch.check_parallel(self.tp, self.pp)
        if self.global_batch_size % (self.micro_batch_size * self.dp):
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size x dp = "
                f"{self.micro_batch_size} x {self.dp}"
            )

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per optimizer step on each DP rank."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def tokens_per_microbatch(self) -> int:
        return self.micro_batch_size * self.seq_length  # packed into one THD sequence by the trainer

    @property
    def layers_per_stage(self) -> int:
        return self.arch.num_layers // self.pp

    @property
    def act_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def norm_impl(self) -> str:
        return self.norm

    @property
    def padded_vocab(self) -> int:
        return -(-self.arch.vocab_size // self.tp) * self.tp  # dms_megatron.megatron.families


@dataclass(frozen=True)
class Assumptions:
    """Every number the plan assumes rather than derives; all are CLI flags of ``launch/plan.py``."""

    gpu_memory_gib: float = 79.6  # H100 80GB HBM3: 81,559 MiB
    fragmentation: float = 0.10  # caching-allocator overhead on top of the allocated peak
    runtime_reserve_gib: float = 2.0  # CUDA context + NCCL communicators (outside the allocator)
    warn_fraction: float = 0.90  # "tight" above this share of gpu_memory_gib
    kl_fp32_buffers: int = 6  # live fp32 [tokens, V/tp] buffers at the KD loss's peak (megatron/kd.py)
    working_layers: float = 1.0  # backward working set (gradients of one layer), in layers
    peak_tflops: float = 989.0  # H100 SXM dense bf16
    matmul_efficiency: float = 0.40  # achieved share of peak on GEMMs
    attention_efficiency: float = 0.15  # DMS FlexAttention fwd+bwd: 149 TFLOP/s measured (benchmarks.md)
    tp_bus_gbs: float = 300.0  # NCCL all-gather / reduce-scatter bus bandwidth inside a node (NVLink)
    dp_bus_gbs: float = 40.0  # across nodes (InfiniBand), per GPU
    hbm_gbs: float = 3350.0  # H100 SXM HBM3: what the memory-bound terms below are divided by
    # HBM bytes moved per [token, vocab/tp] logit by the KD loss, forward + backward (kd_backend=torch):
    # 16.0 ms for 8,192 x 19,008 logits on an H100 (one TP=8 rank of the 32B model, profile of
    # 2026-12-07); the same rate predicted SmolLM2's 81.8 ms (16,384 x 49,152 logits) within 1.2%
    kd_bytes_per_logit: float = 344.0
    # the same for kd_backend=triton (three row-streaming kernels): 0.45 + 0.32 ms for the 32B rank's
    # 8,192 x 19,008 logits and 2.25 + 1.66 ms for SmolLM2's 16,384 x 49,152 on an H100 (2026-12-07):
    # 16.6 and 16.3 bytes per logit
    kd_bytes_per_logit_triton: float = 16.5
    # HBM bytes per trainable parameter (per GPU, / DP) of the optimizer step with the gradient clip and
    # non-finite check: 16.5 ms for 438.5M parameters on the same H100 profile (SmolLM2: 6.4 ms measured,
    # 5.1 predicted)
    optimizer_bytes_per_param: float = 126.0

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if value < 0 or (
                value == 0 and key not in ("fragmentation", "runtime_reserve_gib", "working_layers")
            ):
                raise ValueError(f"{key}={value!r} is invalid: must be > 0")
