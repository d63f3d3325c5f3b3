"""The plan of one layout (memory per stage, step estimate, verdict), the changes that would make an
unfitting plan fit, the layout of a ``RetrofitConfig``, and the printed report."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from dms_megatron.plan.inputs import FP32, GIB, RECOMPUTE, Assumptions, PlanInput
from dms_megatron.plan.memory import (
    StageMemory,
    korthikanti_layer_bytes,
    layer_activation_bytes,
    layer_activation_terms,
    stage_memory,
)
from dms_megatron.plan.step_time import StepEstimate, step_estimate

if TYPE_CHECKING:
    from dms_megatron.config import RetrofitConfig

# --------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Suggestion:
    change: str  # e.g. "parallel.pp=4" or "parallel.recompute=full"
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
    if inp.norm_impl == "fused":
        notes.append(
            "planned with fused norms (bf16 norm weights or Transformer Engine): not a trainer option yet; "
            "the trainer's LocalNorm has fp32 weights (--norm torch)"
        )
    if inp.norm_impl == "torch" and inp.act_bytes < FP32:
        notes.append(
            "torch RMSNorm with fp32 weights on bf16 activations saves fp32 copies (8h+4 bytes per token "
            "per norm instead of 2h+4): bf16 norm weights would save that (--norm fused; not a trainer "
            "option yet)"
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
        changes.append(("parallel.recompute=full", {"recompute": "full"}))
    if inp.tp > 1 and not inp.sequence_parallel:
        changes.append(("parallel.sequence_parallel=true", {"sequence_parallel": True}))
    if inp.norm_impl == "torch" and inp.act_bytes < FP32:
        changes.append(("--norm fused (bf16 norm weights: not a trainer option yet)", {"norm": "fused"}))
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
    cfg: RetrofitConfig, dp: int = 1, recompute: str | None = None, norm: str = "torch"
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
        recompute=cfg.parallel.recompute if recompute is None else recompute,
        variant=cfg.dms.variant,
        train_mode=cfg.train.mode,
        teacher="self" if cfg.train.mode == "adapter" else "separate",
        adapter_bias=cfg.dms.adapter_bias,
        dtype=cfg.model.dtype,
        norm=norm,
        kd_backend="torch" if cfg.dms.kd_backend == "torch" else "triton",  # auto: triton on GPUs
        teacher_graph=cfg.train.teacher_cuda_graph,
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
    if inp.teacher_graph:
        row("teacher CUDA graph (output + one layer)", [_gib(s.teacher_graph) for s in stages])
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
        f"{st.compute_s:.3f} incl. KD loss {st.kd_s:.3f}, TP comm {st.tp_comm_s:.3f}) x "
        f"({st.microbatches} + {inp.pp - 1}) slots (bubble {st.bubble_fraction:.1%}) + DP comm "
        f"{st.dp_comm_s:.2f} s + optimizer {st.optimizer_s:.3f} s",
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
