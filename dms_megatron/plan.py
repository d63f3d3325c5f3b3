"""Memory and throughput planner for a retrofit run: pure arithmetic on ``ModelArch`` (no torch,
megatron or Hydra). ``launch/plan.py`` is its CLI; docs/cluster.md shows it on the 32B preset.

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
spec), times the pipeline's ``(m + pp - 1)`` slots, plus the DP gradient reduce-scatter and parameter
all-gather (``overlap_grad_reduce=False`` in ``training/setup.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from dms_megatron.families import ModelArch

if TYPE_CHECKING:
    from dms_megatron.config import RetrofitConfig

GIB = 2**30
FP32 = 4
RECOMPUTE = ("none", "selective", "full")
NORMS = ("auto", "torch", "fused")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer >= 1")


@dataclass(frozen=True)
class PlanInput:
    """One retrofit layout. ``norm``: ``torch`` = the local spec's ``torch.nn.RMSNorm`` (fp32 weights on
    bf16 inputs, so torch takes its composite path and saves fp32 copies), ``fused`` = Apex / Transformer
    Engine norms (needed for sequence parallelism on GPU), ``auto`` = fused with SP, torch without."""

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
    norm: str = "auto"
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
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"{key}={getattr(self, key)!r} is invalid: choose one of {', '.join(allowed)}"
                )
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
        if self.norm != "auto":
            return self.norm
        return "fused" if self.sequence_parallel else "torch"

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

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if value < 0 or (
                value == 0 and key not in ("fragmentation", "runtime_reserve_gib", "working_layers")
            ):
                raise ValueError(f"{key}={value!r} is invalid: must be > 0")


# --------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class StageParams:
    student: int  # parameters of this GPU's student shard
    trainable: int  # of which trained (all in full mode; the adapters in adapter mode)
    teacher: int  # separate teacher's shard (0 for the self-teacher)


def _layer_params(inp: PlanInput, adapter: bool, adapter_bias: bool) -> tuple[int, int]:
    """(all, adapter-only) parameters of one layer on one TP rank."""
    a = inp.arch
    t = inp.tp
    q, kv = a.num_attention_heads * a.head_dim, a.num_query_groups * a.head_dim
    h, f = a.hidden_size, a.ffn_hidden_size
    sharded = h * (q + 2 * kv) + q * h + 3 * h * f + ((q + 2 * kv) if a.qkv_bias else 0)
    replicated = 2 * h + (2 * a.head_dim if a.qk_norm else 0)
    adapter_params = (
        (h + h * a.num_query_groups + (a.num_query_groups if adapter_bias else 0)) if adapter else 0
    )
    return sharded // t + replicated + adapter_params, adapter_params


def stage_params(inp: PlanInput, stage: int) -> StageParams:
    """Parameters one GPU of pipeline stage ``stage`` holds (megatron GPTModel layout)."""
    a, L = inp.arch, inp.layers_per_stage
    first, last = stage == 0, stage == inp.pp - 1
    embedding = inp.padded_vocab * a.hidden_size // inp.tp
    head = 0
    if last:
        head += a.hidden_size  # final norm
        if not a.tie_word_embeddings or inp.pp > 1:  # tied + PP: the last stage holds a synced copy
            head += embedding
    per_layer, adapter = _layer_params(inp, inp.variant == "adapter", inp.adapter_bias)
    student = L * per_layer + (embedding if first else 0) + head
    trainable = student if inp.train_mode == "full" else L * adapter
    teacher = 0
    if inp.teacher == "separate":  # built as adapter-variant modules with eviction off (training/setup.py)
        teacher_layer, _ = _layer_params(inp, True, inp.adapter_bias)
        teacher = L * teacher_layer + (embedding if first else 0) + head
    return StageParams(student=student, trainable=trainable, teacher=teacher)


def total_params(arch: ModelArch) -> int:
    """Whole-model parameter count (no DMS adapters), e.g. 32.76e9 for R1-Distill-Qwen-32B."""
    return stage_params(PlanInput(arch=arch, global_batch_size=1), 0).student


# -------------------------------------------------------------------------------------- activations


def _norm_bytes(inp: PlanInput, width: int) -> float:
    """Bytes per token one RMSNorm keeps for backward. torch's ``rms_norm`` with a weight of another
    dtype than its input takes the composite path (layer_norm.cpp), which saves the fp32 upcast input
    and the fp32 normalised output, not the bf16 input; a fused norm saves its input and fp32 rstd."""
    e = inp.act_bytes
    if inp.norm_impl == "torch" and e < FP32:
        return 8 * width + 4
    return e * width + 4


def layer_activation_terms(inp: PlanInput, recompute: str | None = None) -> dict[str, float]:
    """Bytes per token that one transformer layer keeps for backward on one GPU, by tensor.

    ``sd`` divides what sequence parallelism shards (norms and the GEMM inputs next to them, the
    residual stream), ``t`` what tensor parallelism shards (heads, FFN columns). Without recompute:

        input_norm, mlp_norm      norm(h) each (see ``_norm_bytes``)                 / sd
        qkv_input, fc1_input      e*h each (saved by the column-parallel GEMMs)      / sd
        rope_cos_sin              4 tensors [s, 1, 1, d]: 4*e*d (not sharded)
        attention                 FlexAttention saves q and k (own tensors after RoPE), v -- a view
                                  of the fused QKV output, which keeps all of it (q + 2kv) alive --,
                                  its output and the fp32 log-sum-exp: e*(3q + 3kv) + 4*heads  / t
        dms_decisions             [b, Hkv, s] fp32: sigmoid, logsigmoid input + buffer, shifted
                                  log-keep (captured by flex), mask: ~5 x 4 bytes * Hkv  / t
        proj_input                e*q                                                / t
        mlp                       SwiGLU unfused: fc1 output (2f, kept by silu's input view), silu
                                  output f, x_linear + glu_linear_offset f, fc2 input f: e*5f / t
        adapter (variant)         adapter RMSNorm output (Linear input) e*h, its own rstd, and the
                                  residual it normalises when the layer norm did not keep it  / sd
        qk_norm (qwen3)           norm(q) + norm(kv) per head                        / t

    Korthikanti et al.'s GeLU layer has the same structure (34 s*b*h with dropout masks and 4h GeLU
    columns; 5*a*s^2*b for the stored scores, which FlexAttention does not keep).
    ``selective`` (megatron ``recompute_modules=["core_attn"]``): the checkpoint keeps its inputs (q and
    k after RoPE, v and so the fused QKV output, the fp32 logits) instead of flex's: it saves only flex's
    output, the log-sum-exp and the decision tensors, a few percent here. ``full``: only the layer input
    (e*h / sd) is kept.
    """
    recompute = inp.recompute if recompute is None else recompute
    a = inp.arch
    e, t = inp.act_bytes, inp.tp
    sd = t if inp.sequence_parallel else 1
    h, d, f = a.hidden_size, a.head_dim, a.ffn_hidden_size
    heads, kv_heads = a.num_attention_heads, a.num_query_groups
    q, kv = heads * d, kv_heads * d
    if recompute == "full":
        return {"layer_input": e * h / sd}
    terms: dict[str, float] = {
        "input_norm": _norm_bytes(inp, h) / sd,
        "qkv_input": e * h / sd,
        "rope_cos_sin": 4.0 * e * d,  # cos and sin for q and k, computed per call in the model dtype
    }
    if inp.variant == "adapter":
        keeps_residual = inp.norm_impl == "fused" or e == FP32  # the input norm already saved x
        terms["adapter"] = (e * h + (0 if keeps_residual else e * h) + 4) / sd
    if a.qk_norm:
        terms["qk_norm"] = _norm_bytes(inp, d) * (heads + kv_heads) / t
    if recompute == "selective":
        terms["core_attn_checkpoint"] = (e * (q + kv) + e * (q + 2 * kv) + 4 * kv_heads) / t
    else:
        terms["attention"] = (e * (3 * q + 3 * kv) + 4 * heads) / t
        terms["dms_decisions"] = 20.0 * kv_heads / t
    terms["proj_input"] = e * q / t
    terms["mlp_norm"] = _norm_bytes(inp, h) / sd
    terms["fc1_input"] = e * h / sd
    terms["mlp"] = e * 5 * f / t
    return terms


def layer_activation_bytes(inp: PlanInput, recompute: str | None = None) -> float:
    return sum(layer_activation_terms(inp, recompute).values())


def korthikanti_layer_bytes(inp: PlanInput, recompute: str | None = None) -> float:
    """The paper's per-layer bytes per token for a GPT layer of this width (GeLU MLP of 4h, dropout,
    attention scores stored), for comparison only: ``h*(34 + 5*a*s/h)`` divided by t with SP,
    ``h*(10 + 24/t + 5*a*s/(h*t))`` with TP alone; selective recompute keeps ``34*h/t``
    (``h*(10 + 24/t)`` without SP); full recompute ``2*h`` (``/t`` with SP)."""
    recompute = inp.recompute if recompute is None else recompute
    h, a, s, t = inp.arch.hidden_size, inp.arch.num_attention_heads, inp.seq_length, inp.tp
    scores = 0.0 if recompute == "selective" else 5.0 * a * s / t
    if recompute == "full":
        return 2.0 * h / (t if inp.sequence_parallel else 1)
    if inp.sequence_parallel:
        return 34.0 * h / t + scores
    return h * (10.0 + 24.0 / t) + scores


# ------------------------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of pipeline stage ``stage`` at its peak."""

    stage: int
    layers: int
    in_flight: int  # micro-batches whose activations are alive at once (1F1B)
    student_params: float
    grads: float
    optimizer: float
    teacher_params: float
    activations: float  # layers x per-layer x tokens x in_flight
    p2p: float
    lm_head: float  # last stage: final-norm and output-layer inputs
    logits_kl: float  # last stage: logits + KD loss buffers at the loss's peak
    working: float  # backward working set
    allocated: float  # what torch.cuda.max_memory_allocated would report
    reserved: float  # allocated x (1 + fragmentation) + runtime reserve

    @property
    def static(self) -> float:
        return self.student_params + self.grads + self.optimizer + self.teacher_params


def stage_memory(inp: PlanInput, asm: Assumptions, stage: int) -> StageMemory:
    a, e = inp.arch, inp.act_bytes
    sd = inp.tp if inp.sequence_parallel else 1
    tokens = inp.tokens_per_microbatch
    last = stage == inp.pp - 1
    params = stage_params(inp, stage)
    master = 0 if inp.dtype == "fp32" else FP32  # fp32 models: the distributed optimizer reuses the params
    in_flight = min(inp.pp - stage, inp.num_microbatches)
    per_layer = layer_activation_bytes(inp)
    activations = tokens * inp.layers_per_stage * per_layer * in_flight
    p2p_each = tokens * (2 * a.hidden_size + 2) * e / sd
    p2p = p2p_each * in_flight * ((stage > 0) + (not last))  # received inputs and sent outputs
    lm_head = logits_kl = 0.0
    working = asm.working_layers * tokens * layer_activation_bytes(inp, "none")
    if inp.recompute == "full":  # the layer being recomputed holds its full activations meanwhile
        working += tokens * layer_activation_bytes(inp, "none")
    if last:
        lm_head = tokens * (_norm_bytes(inp, a.hidden_size) + e * a.hidden_size) / sd
        shard = tokens * inp.padded_vocab / inp.tp
        logits_kl = shard * (2 * e + FP32 * asm.kl_fp32_buffers)
    # the loss's peak comes before the backward starts; the working set after it
    transient = max(logits_kl, working) if last else working
    static = {
        "student_params": params.student * e,
        "grads": params.trainable * FP32,
        "optimizer": params.trainable * (master + 2 * FP32) / inp.dp,
        "teacher_params": params.teacher * e,
    }
    allocated = sum(static.values()) + activations + p2p + lm_head + transient
    return StageMemory(
        stage=stage,
        layers=inp.layers_per_stage,
        in_flight=in_flight,
        **static,
        activations=activations,
        p2p=p2p,
        lm_head=lm_head,
        logits_kl=logits_kl,
        working=working,
        allocated=allocated,
        reserved=allocated * (1 + asm.fragmentation) + asm.runtime_reserve_gib * GIB,
    )


# --------------------------------------------------------------------------------------------- time


def forward_flops_per_token(arch: ModelArch, seq_length: int) -> dict[str, float]:
    """Forward matmul FLOPs per token (2 per multiply-add), split as ``layer_matmul`` (one layer's
    projections and MLP), ``layer_attention`` (QK^T and PV over (s + 1) / 2 causal keys on average)
    and ``head`` (output layer). Same count as ``training.metrics.forward_flops_per_token``."""
    h, d, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    return {
        "layer_matmul": 2.0 * (h * q + 2 * h * kv + q * h + 3 * h * f),
        "layer_attention": 2.0 * q * (seq_length + 1),
        "head": 2.0 * h * arch.vocab_size,
    }


def _multipliers(inp: PlanInput) -> dict[str, float]:
    """Passes per token: teacher forward (1) + student forward (1) + backward (GEMMs: 2 with weight
    gradients, 1 when the weights are frozen; attention: 2), plus recompute (hardware FLOPs only)."""
    bwd = 2.0 if inp.train_mode == "full" else 1.0
    mm_extra = 1.0 if inp.recompute == "full" else 0.0
    attn_extra = 1.0 if inp.recompute in ("full", "selective") else 0.0
    return {
        "matmul": 2.0 + bwd,
        "attention": 4.0,
        "head": 2.0 + bwd,
        "matmul_hw": 2.0 + bwd + mm_extra,
        "attention_hw": 4.0 + attn_extra,
    }


def model_flops_per_token(inp: PlanInput) -> float:
    """Model FLOPs per trained token, teacher included (4x forward in full mode), no recompute."""
    fl, mult = forward_flops_per_token(inp.arch, inp.seq_length), _multipliers(inp)
    L = inp.arch.num_layers
    return (
        L * (fl["layer_matmul"] * mult["matmul"] + fl["layer_attention"] * mult["attention"])
        + fl["head"] * mult["head"]
    )


@dataclass(frozen=True)
class StepEstimate:
    microbatches: int
    bubble_fraction: float  # (pp - 1) / m
    stage_microbatch_s: list[float]  # compute + TP communication per micro-batch, per stage
    compute_s: float  # slowest stage, one micro-batch
    tp_comm_s: float  # slowest stage, one micro-batch
    dp_comm_s: float
    step_s: float
    tokens_per_s: float
    model_flops_per_token: float
    tflops_per_gpu: float
    mfu: float


def step_estimate(inp: PlanInput, asm: Assumptions) -> StepEstimate:
    fl, mult = forward_flops_per_token(inp.arch, inp.seq_length), _multipliers(inp)
    tokens, t, e = inp.tokens_per_microbatch, inp.tp, inp.act_bytes
    peak = asm.peak_tflops * 1e12
    # all-gather equivalents of one [tokens, h] tensor per layer per micro-batch: SP: 4 per forward pass
    # (teacher, student), 6 per backward (4 + the weight gradients' re-gathered inputs); without SP an
    # all-reduce = 2 all-gathers: 2 x 2 per pass
    if inp.sequence_parallel:
        colls = 8 + (6 if inp.train_mode == "full" else 4) + (4 if inp.recompute == "full" else 0)
    else:
        colls = 12 + (4 if inp.recompute == "full" else 0)
    coll_s = tokens * inp.arch.hidden_size * e * (t - 1) / t / (asm.tp_bus_gbs * 1e9) if t > 1 else 0.0
    stages, comps, comms = [], [], []
    for stage in range(inp.pp):
        L = inp.layers_per_stage
        mm = L * fl["layer_matmul"] * mult["matmul_hw"]
        if stage == inp.pp - 1:
            mm += fl["head"] * mult["head"]
        attn = L * fl["layer_attention"] * mult["attention_hw"]
        compute = (
            tokens / t * (mm / (peak * asm.matmul_efficiency) + attn / (peak * asm.attention_efficiency))
        )
        comm = colls * L * coll_s
        stages.append(compute + comm)
        comps.append(compute)
        comms.append(comm)
    slow = max(range(inp.pp), key=lambda i: stages[i])
    m = inp.num_microbatches
    trainable = max(stage_params(inp, i).trainable for i in range(inp.pp))
    dp_bytes = trainable * (FP32 + e) * (inp.dp - 1) / inp.dp  # fp32 grad reduce-scatter + param all-gather
    dp_s = dp_bytes / (asm.dp_bus_gbs * 1e9)
    step = stages[slow] * (m + inp.pp - 1) + dp_s
    tps = inp.global_batch_size * inp.seq_length / step
    mfpt = model_flops_per_token(inp)
    tflops = tps * mfpt / inp.world_size / 1e12
    return StepEstimate(
        microbatches=m,
        bubble_fraction=(inp.pp - 1) / m,
        stage_microbatch_s=stages,
        compute_s=comps[slow],
        tp_comm_s=comms[slow],
        dp_comm_s=dp_s,
        step_s=step,
        tokens_per_s=tps,
        model_flops_per_token=mfpt,
        tflops_per_gpu=tflops,
        mfu=tflops / asm.peak_tflops,
    )


# --------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Suggestion:
    change: str  # e.g. "parallel.pp=4" or "--recompute full"
    reserved_gib: float
    step_s: float


@dataclass(frozen=True)
class Plan:
    inp: PlanInput
    assumptions: Assumptions
    stages: list[StageMemory]
    step: StepEstimate
    notes: list[str] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.reserved)

    @property
    def capacity(self) -> float:
        return self.assumptions.gpu_memory_gib * GIB

    @property
    def fits(self) -> bool:
        return self.worst.reserved <= self.capacity

    @property
    def status(self) -> str:
        if not self.fits:
            return "does not fit"
        return "tight" if self.worst.reserved > self.assumptions.warn_fraction * self.capacity else "fits"

    def to_dict(self) -> dict[str, Any]:
        inp = asdict(self.inp)
        return {
            "input": {**inp, "world_size": self.inp.world_size, "norm_impl": self.inp.norm_impl},
            "assumptions": asdict(self.assumptions),
            "per_layer_bytes_per_token": {r: layer_activation_terms(self.inp, r) for r in RECOMPUTE},
            "stages": [{**asdict(s), "static": s.static} for s in self.stages],
            "step": asdict(self.step),
            "status": self.status,
            "fits": self.fits,
            "worst_stage": self.worst.stage,
            "worst_reserved_gib": self.worst.reserved / GIB,
            "capacity_gib": self.assumptions.gpu_memory_gib,
            "notes": list(self.notes),
            "suggestions": [asdict(s) for s in self.suggestions],
        }


def _notes(inp: PlanInput) -> list[str]:
    notes = []
    if inp.sequence_parallel and inp.norm_impl == "fused":
        notes.append(
            "sequence parallelism with the local spec needs Apex or Transformer Engine norms on GPU "
            "(megatron's WrappedTorchNorm refuses SP; docs/benchmarks.md); planned with fused norms"
        )
    if inp.norm_impl == "torch" and inp.act_bytes < FP32:
        notes.append(
            "torch RMSNorm with fp32 weights on bf16 activations saves fp32 copies (8h+4 bytes per token "
            "per norm instead of 2h+4): casting the norm weights to bf16 would save that"
        )
    if inp.recompute != "none":
        notes.append(
            f"recompute={inp.recompute} is not a trainer option yet (parallel.* has no recompute key); "
            "the DMS layer supports it (tests/megatron/test_dms_megatron.py)"
        )
    if inp.recompute == "selective":
        notes.append(
            "selective (core-attention) recompute saves little with FlexAttention: no s^2 scores are "
            "stored; only flex's output, log-sum-exp and the DMS decision tensors are dropped"
        )
    return notes


def _variants(inp: PlanInput, max_tp: int) -> Iterator[tuple[str, PlanInput]]:
    """Valid single-setting changes at the same world size (DP absorbs TP/PP changes)."""
    world = inp.world_size
    changes: list[tuple[str, dict[str, Any]]] = []
    if inp.recompute != "full":
        changes.append(("--recompute full", {"recompute": "full"}))
    if inp.tp > 1 and not inp.sequence_parallel:
        needs = " (needs Apex/TE norms)" if inp.norm == "auto" else ""
        changes.append((f"parallel.sequence_parallel=true{needs}", {"sequence_parallel": True}))
    if inp.norm_impl == "torch" and inp.act_bytes < FP32:
        changes.append(("--norm fused (bf16 norm weights, or Apex/TE)", {"norm": "fused"}))
    mbs = inp.micro_batch_size // 2
    while mbs >= 1:
        changes.append((f"parallel.micro_batch_size={mbs}", {"micro_batch_size": mbs}))
        mbs //= 2
    for pp in (inp.pp * 2, inp.pp * 4):
        if world % (inp.tp * pp) == 0:
            changes.append((f"parallel.pp={pp}", {"pp": pp, "dp": world // (inp.tp * pp)}))
    for tp in (inp.tp * 2, inp.tp * 4):
        if tp <= max_tp and world % (tp * inp.pp) == 0:
            changes.append((f"parallel.tp={tp}", {"tp": tp, "dp": world // (tp * inp.pp)}))
    for label, kwargs in changes:
        try:
            yield label, replace(inp, **kwargs)
        except ValueError:  # e.g. layers or heads not divisible, batch not a multiple of DP
            continue


def _reserved_and_step(inp: PlanInput, asm: Assumptions) -> tuple[float, float]:
    reserved = max(stage_memory(inp, asm, i).reserved for i in range(inp.pp))
    return reserved, step_estimate(inp, asm).step_s


def suggest(inp: PlanInput, asm: Assumptions, max_tp: int = 8, limit: int = 5) -> list[Suggestion]:
    """Changes that make the plan fit: single settings first, then pairs; fastest first."""
    capacity = asm.gpu_memory_gib * GIB
    found: list[Suggestion] = []
    singles = list(_variants(inp, max_tp))
    for label, cand in singles:
        reserved, step = _reserved_and_step(cand, asm)
        if reserved <= capacity:
            found.append(Suggestion(label, reserved / GIB, step))
    if not found:
        for label, cand in singles:
            for label2, cand2 in _variants(cand, max_tp):
                if label2.split("=")[0].split(" ")[0] == label.split("=")[0].split(" ")[0]:
                    continue
                reserved, step = _reserved_and_step(cand2, asm)
                if reserved <= capacity:
                    found.append(Suggestion(f"{label} + {label2}", reserved / GIB, step))
    unique: dict[frozenset[str], Suggestion] = {}
    for s in sorted(found, key=lambda s: s.step_s):
        unique.setdefault(frozenset(s.change.split(" + ")), s)  # "a + b" and "b + a" are one change
    return list(unique.values())[:limit]


def make_plan(inp: PlanInput, asm: Assumptions | None = None, max_tp: int = 8) -> Plan:
    asm = asm or Assumptions()
    plan = Plan(
        inp=inp,
        assumptions=asm,
        stages=[stage_memory(inp, asm, i) for i in range(inp.pp)],
        step=step_estimate(inp, asm),
        notes=_notes(inp),
    )
    if plan.fits:
        return plan
    return replace(plan, suggestions=suggest(inp, asm, max_tp))


def plan_input_from_config(
    cfg: RetrofitConfig, dp: int = 1, recompute: str = "none", norm: str = "auto"
) -> PlanInput:
    """The layout of a validated ``RetrofitConfig`` (teacher: separate in full mode, self in adapter
    mode, as ``training/setup.py`` builds it)."""
    from dms_megatron.families import arch_from_hf_config

    p = cfg.parallel
    return PlanInput(
        arch=arch_from_hf_config(cfg.model.hf_config),
        tp=p.tp,
        pp=p.pp,
        dp=dp,
        micro_batch_size=p.micro_batch_size,
        global_batch_size=p.global_batch_size,
        seq_length=cfg.data.seq_length,
        sequence_parallel=p.sequence_parallel,
        recompute=recompute,
        variant=cfg.dms.variant,
        train_mode=cfg.train.mode,
        teacher="self" if cfg.train.mode == "adapter" else "separate",
        adapter_bias=cfg.dms.adapter_bias,
        dtype=cfg.model.dtype,
        norm=norm,
        name=cfg.model.name,
    )


# ------------------------------------------------------------------------------------------- output


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def format_plan(plan: Plan) -> str:
    """A readable report: layout, per-stage memory table, step estimate, verdict."""
    inp, asm, a = plan.inp, plan.assumptions, plan.inp.arch
    shown = sorted({0, inp.pp - 1, plan.worst.stage}) if inp.pp > 4 else list(range(inp.pp))
    stages = [plan.stages[i] for i in shown]
    lines = [
        f"model {inp.name or a.architecture}: {a.family}, {a.num_layers} layers, hidden {a.hidden_size}, "
        f"heads {a.num_attention_heads}/{a.num_query_groups} x {a.head_dim}, ffn {a.ffn_hidden_size}, "
        f"vocab {a.vocab_size}",
        f"layout: TP {inp.tp} x PP {inp.pp} x DP {inp.dp} = {inp.world_size} GPUs, "
        f"SP {'on' if inp.sequence_parallel else 'off'}, recompute {inp.recompute}, norms {inp.norm_impl}; "
        f"micro-batch {inp.micro_batch_size} x {inp.seq_length} tokens, global batch "
        f"{inp.global_batch_size} -> {inp.num_microbatches} micro-batches per step per DP rank",
        f"DMS: variant {inp.variant}, train mode {inp.train_mode}, teacher {inp.teacher}, dtype {inp.dtype}",
        "",
    ]
    header = f"{'memory per GPU (GiB)':<46}" + "".join(f"{'stage ' + str(s.stage):>11}" for s in stages)
    lines.append(header)

    def row(label: str, values: list[str]) -> None:
        lines.append(f"  {label:<44}" + "".join(f"{v:>11}" for v in values))

    master = "" if inp.dtype == "fp32" else "master + "
    row(f"student params ({inp.dtype})", [_gib(s.student_params) for s in stages])
    row("grads (fp32 main_grad, not sharded)", [_gib(s.grads) for s in stages])
    row(f"optimizer (fp32 {master}Adam m, v) / DP {inp.dp}", [_gib(s.optimizer) for s in stages])
    row(f"teacher params ({inp.teacher})", [_gib(s.teacher_params) for s in stages])
    row("activations", [_gib(s.activations) for s in stages])
    row("  = layers x micro-batches in flight", [f"{s.layers} x {s.in_flight}" for s in stages])
    tokens = inp.tokens_per_microbatch
    per = {r: layer_activation_bytes(inp, r) * tokens for r in RECOMPUTE}
    lines.append(
        f"    per layer and micro-batch: none {per['none'] / GIB:.3f}, selective "
        f"{per['selective'] / GIB:.3f}, full {per['full'] / GIB:.3f} GiB "
        f"({layer_activation_bytes(inp):,.0f} bytes/token at recompute={inp.recompute}; Korthikanti et al.'s "
        f"GPT layer of this width: {korthikanti_layer_bytes(inp) * tokens / GIB:.3f})"
    )
    row("pipeline P2P buffers", [_gib(s.p2p) for s in stages])
    row("LM head inputs", [_gib(s.lm_head) for s in stages])
    row(
        f"logits + KL ({asm.kl_fp32_buffers} fp32 [tokens, V/tp] buffers)",
        [_gib(s.logits_kl) for s in stages],
    )
    row("backward working set (max with logits+KL)", [_gib(s.working) for s in stages])
    row("allocated peak", [_gib(s.allocated) for s in stages])
    row(
        f"+ {asm.fragmentation:.0%} fragmentation + {asm.runtime_reserve_gib:g} GiB reserve",
        [_gib(s.reserved) for s in stages],
    )
    st = plan.step
    w = plan.worst
    lines += [
        "",
        f"step: {st.step_s:.2f} s = {st.compute_s + st.tp_comm_s:.3f} s per micro-batch (compute "
        f"{st.compute_s:.3f}, TP comm {st.tp_comm_s:.3f}) x ({st.microbatches} + {inp.pp - 1}) slots "
        f"(bubble {st.bubble_fraction:.1%}) + DP comm {st.dp_comm_s:.2f} s",
        f"      {st.tokens_per_s:,.0f} tokens/s, {st.model_flops_per_token / 1e9:.2f} GFLOP/token (teacher "
        f"included), {st.tflops_per_gpu:.0f} TFLOP/s per GPU, MFU {st.mfu:.1%} (assumed: GEMMs "
        f"{asm.matmul_efficiency:.0%}, attention {asm.attention_efficiency:.0%} of "
        f"{asm.peak_tflops:g} TFLOP/s)",
        "",
        f"verdict: {plan.status} -- stage {w.stage} needs {w.reserved / GIB:.1f} of "
        f"{asm.gpu_memory_gib:g} GiB "
        f"({w.reserved / plan.capacity:.0%})",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    if plan.suggestions:
        lines.append("settings that fit (fastest first):")
        lines += [
            f"  {s.change:<58} {s.reserved_gib:6.1f} GiB  {s.step_s:7.2f} s/step" for s in plan.suggestions
        ]
    elif not plan.fits:
        lines.append("no single or paired change of recompute / SP / micro-batch / TP / PP fits: add GPUs")
    return "\n".join(lines)
