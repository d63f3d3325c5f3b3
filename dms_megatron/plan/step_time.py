"""Step time from FLOP counts: GEMMs and attention at assumed shares of the peak, the KD loss and the
optimizer step as memory traffic, TP collectives, the 1F1B pipeline's slots and the DP
gradient/parameter exchange."""

from __future__ import annotations

from dataclasses import dataclass

from dms_megatron.families import ModelArch
from dms_megatron.plan.inputs import FP32, Assumptions, PlanInput
from dms_megatron.plan.memory import stage_params

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
    compute_s: float  # slowest stage, one micro-batch (GEMMs, attention, the KD loss on the last stage)
    tp_comm_s: float  # slowest stage, one micro-batch
    kd_s: float  # the KD loss of one micro-batch (last stage; memory-bound), part of compute_s there
    dp_comm_s: float
    optimizer_s: float  # the optimizer step with its gradient clip and non-finite check (memory-bound)
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
    hbm = asm.hbm_gbs * 1e9
    # the KD loss reads and writes [tokens, V/tp] logits: many times over with torch (fp32 softmaxes,
    # their backward), about four reads and a write with the Triton kernels
    per_logit = asm.kd_bytes_per_logit_triton if inp.kd_backend == "triton" else asm.kd_bytes_per_logit
    kd_s = tokens * inp.padded_vocab / t * per_logit / hbm
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
        if stage == inp.pp - 1:
            compute += kd_s
        comm = colls * L * coll_s
        stages.append(compute + comm)
        comps.append(compute)
        comms.append(comm)
    slow = max(range(inp.pp), key=lambda i: stages[i])
    m = inp.num_microbatches
    trainable = max(stage_params(inp, i).trainable for i in range(inp.pp))
    dp_bytes = trainable * (FP32 + e) * (inp.dp - 1) / inp.dp  # fp32 grad reduce-scatter + param all-gather
    dp_s = dp_bytes / (asm.dp_bus_gbs * 1e9)
    # the distributed optimizer updates 1/DP of the trainable parameters on each GPU
    opt_s = trainable / inp.dp * asm.optimizer_bytes_per_param / hbm
    step = stages[slow] * (m + inp.pp - 1) + dp_s + opt_s
    tps = inp.global_batch_size * inp.seq_length / step
    mfpt = model_flops_per_token(inp)
    tflops = tps * mfpt / inp.world_size / 1e12
    return StepEstimate(
        microbatches=m,
        bubble_fraction=(inp.pp - 1) / m,
        stage_microbatch_s=stages,
        compute_s=comps[slow],
        tp_comm_s=comms[slow],
        kd_s=kd_s,
        dp_comm_s=dp_s,
        optimizer_s=opt_s,
        step_s=step,
        tokens_per_s=tps,
        model_flops_per_token=mfpt,
        tflops_per_gpu=tflops,
        mfu=tflops / asm.peak_tflops,
    )
