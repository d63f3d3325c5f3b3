"""Bytes per GPU: parameters of a pipeline stage, activations per layer (by tensor), and a stage's
peak (static memory, activations of the micro-batches in flight, P2P buffers, the loss's buffers)."""

from __future__ import annotations

from dataclasses import dataclass

from dms_megatron.families import ModelArch
from dms_megatron.plan.inputs import FP32, GIB, Assumptions, PlanInput

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


def _norm_bytes(inp: PlanInput, width: int, composite: bool = False) -> float:
    """Bytes per token one RMSNorm keeps for backward. torch's ``rms_norm`` with a weight of another
    dtype than its input takes the composite path (layer_norm.cpp), which saves the fp32 upcast input
    and the fp32 normalised output, not the bf16 input; a fused norm saves its input and fp32 rstd.
    ``composite``: every norm takes the composite path (torch on CPU has no fused kernel)."""
    e = inp.act_bytes
    if composite or (inp.norm_impl == "torch" and e < FP32):
        return 8 * width + 4
    return e * width + 4


def layer_activation_terms(
    inp: PlanInput, recompute: str | None = None, composite_norms: bool = False
) -> dict[str, float]:
    """Bytes per token that one transformer layer keeps for backward on one GPU, by tensor.

    ``sd`` divides what sequence parallelism shards (norms and the GEMM inputs next to them, the
    residual stream), ``t`` what tensor parallelism shards (heads, FFN columns). Without recompute:

        input_norm, mlp_norm      norm(h) each (see ``_norm_bytes``)                 / sd
        qkv_input, fc1_input      e*h each (saved by the column-parallel GEMMs)      / sd
        rope_cos_sin              4 tensors [s, 1, 1, d]: 4*e*d (not sharded)
        attention                 FlexAttention saves q and k (own tensors after RoPE), v -- a view
                                  of the fused QKV output, which keeps all of it (q + 2kv) alive --
                                  and the fp32 log-sum-exp: e*(2q + 3kv) + 4*heads         / t
        dms_decisions             [b, Hkv, s] fp32: sigmoid, logsigmoid input + buffer, shifted
                                  log-keep (captured by flex), mask: ~5 x 4 bytes * Hkv  / t
        proj_input                e*q: flex's output, which it also saves; the output
                                  projection's input is a view of the same storage      / t
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

    ``composite_norms``: every RMSNorm (the adapter's too) takes torch's composite path, as on CPU, where
    ``benchmarks/activation_check.py`` checks these terms against the real layer (bf16 models).
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
        "input_norm": _norm_bytes(inp, h, composite_norms) / sd,
        "qkv_input": e * h / sd,
        "rope_cos_sin": 4.0 * e * d,  # cos and sin for q and k, computed per call in the model dtype
    }
    if inp.variant == "adapter":
        if composite_norms:  # the adapter norm's own fp32 copies and rstd, and the Linear's input
            terms["adapter"] = (e * h + 8 * h + 4) / sd
        else:  # a fused norm (bf16 weights) saves x, unless the input norm already did, and rstd
            keeps_residual = inp.norm_impl == "fused" or e == FP32
            terms["adapter"] = (e * h + (0 if keeps_residual else e * h) + 4) / sd
    if a.qk_norm:
        terms["qk_norm"] = _norm_bytes(inp, d, composite_norms) * (heads + kv_heads) / t
    if recompute == "selective":
        terms["core_attn_checkpoint"] = (e * (q + kv) + e * (q + 2 * kv) + 4 * kv_heads) / t
    else:
        terms["attention"] = (e * (2 * q + 3 * kv) + 4 * heads) / t  # output: proj_input
        terms["dms_decisions"] = 20.0 * kv_heads / t
    terms["proj_input"] = e * q / t
    terms["mlp_norm"] = _norm_bytes(inp, h, composite_norms) / sd
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
    teacher_graph: float  # the teacher's CUDA graph: its static output and one layer's no-grad temporaries
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
    teacher_graph = 0.0
    if inp.teacher_graph:  # the graph's pool keeps its output (logits or the stage's hidden) and, at most,
        # one layer's no-grad temporaries (bounded by what autograd would save for that layer)
        output = tokens * inp.padded_vocab / inp.tp * e if last else tokens * a.hidden_size * e / sd
        teacher_graph = output + tokens * layer_activation_bytes(inp, "none")
    # the loss's peak comes before the backward starts; the working set after it
    transient = max(logits_kl, working) if last else working
    static = {
        "student_params": params.student * e,
        "grads": params.trainable * FP32,
        "optimizer": params.trainable * (master + 2 * FP32) / inp.dp,
        "teacher_params": params.teacher * e,
    }
    allocated = sum(static.values()) + activations + p2p + lm_head + transient + teacher_graph
    return StageMemory(
        stage=stage,
        layers=inp.layers_per_stage,
        in_flight=in_flight,
        **static,
        activations=activations,
        p2p=p2p,
        lm_head=lm_head,
        logits_kl=logits_kl,
        teacher_graph=teacher_graph,
        working=working,
        allocated=allocated,
        reserved=allocated * (1 + asm.fragmentation) + asm.runtime_reserve_gib * GIB,
    )
