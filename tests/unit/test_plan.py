"""The memory/throughput planner (dms_megatron/plan/) and its CLI (launch/plan.py)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from dms_megatron.families import load_model_preset
from dms_megatron.plan import (
    GIB,
    Assumptions,
    PlanInput,
    layer_activation_bytes,
    layer_activation_terms,
    make_plan,
    model_flops_per_token,
    stage_memory,
    step_estimate,
    total_params,
)

ROOT = Path(__file__).resolve().parents[2]


def _arch(name):
    return load_model_preset(name)[0]


def _tiny(**kw) -> PlanInput:
    """debug_llama: 4 layers, h 64, ffn 128, 4 heads / 2 KV heads of 16, vocab 96, tied embeddings."""
    base = dict(
        arch=_arch("debug_llama"), micro_batch_size=2, global_batch_size=4, seq_length=32, name="debug_llama"
    )
    return PlanInput(**{**base, **kw})


def test_tiny_plan_by_hand():
    inp, asm = _tiny(), Assumptions()
    h, f, L, V, d, heads, kv_heads = 64, 128, 4, 96, 16, 4, 2
    q, kv = heads * d, kv_heads * d  # 64, 32
    tokens = 2 * 32  # micro-batch x sequence, one THD sequence
    # parameters: q/k/v + o + gate/up/down + two norms per layer, embedding (tied: one copy), final norm
    layer = h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h
    student = L * layer + V * h + h
    assert student == 154_176
    teacher = student + L * (h + h * kv_heads)  # the separate teacher is built with (zero) adapters
    # static bytes: bf16 params 2, fp32 main_grad 4, optimizer fp32 master + m + v = 12 (DP 1), teacher 2
    static = 2 * student + 4 * student + 12 * student + 2 * teacher
    # per layer and token, bf16, no SP, torch norms with fp32 weights (composite path: fp32 input + output)
    norm = 8 * h + 4
    per_layer = (
        norm  # input norm
        + 2 * h  # qkv GEMM input
        + 8 * d  # RoPE cos/sin for q and k, bf16 [s, 1, 1, d] x 4
        + 2 * (q + kv + (q + 2 * kv))  # flex: q, k, v (a view keeping the fused QKV output)
        + 4 * heads  # flex's fp32 log-sum-exp
        + 20 * kv_heads  # DMS decision tensors, fp32
        + 2 * q  # flex's output = the output projection's input (one storage, measured on H100)
        + norm  # pre-MLP norm
        + 2 * h  # fc1 input
        + 2 * 5 * f  # SwiGLU: fc1 output (2f), silu(gate), up + offset, fc2 input
    )
    assert per_layer == 3328 == layer_activation_bytes(inp)
    activations = tokens * L * per_layer * 1  # PP 1: one micro-batch in flight
    lm_head = tokens * (norm + 2 * h)  # final norm + output-layer input
    logits_kl = tokens * V * (2 * 2 + 4 * 6)  # student + teacher bf16 logits, 6 fp32 buffers
    working = tokens * per_layer
    allocated = static + activations + lm_head + max(logits_kl, working)
    got = stage_memory(inp, asm, 0)
    assert got.student_params == 2 * student and got.teacher_params == 2 * teacher
    assert got.grads == 4 * student and got.optimizer == 12 * student
    assert (got.activations, got.lm_head, got.logits_kl, got.working) == (
        activations,
        lm_head,
        logits_kl,
        working,
    )
    assert got.allocated == allocated == 4_191_232
    assert got.reserved == pytest.approx(allocated * 1.1 + 2 * GIB)

    # FLOPs per token: (teacher fwd + student fwd + bwd) = 4 x forward, causal attention over (s+1)/2 keys
    s = 32
    fwd_layer_mm = 2 * (h * q + 2 * h * kv + q * h + 3 * h * f)
    fwd_layer_attn = 2 * q * (s + 1)
    fwd_head = 2 * h * V
    assert model_flops_per_token(inp) == 4 * (L * (fwd_layer_mm + fwd_layer_attn) + fwd_head) == 1_296_384
    peak = 989e12
    micro_s = tokens * (
        4 * (L * fwd_layer_mm + fwd_head) / (0.4 * peak) + 4 * L * fwd_layer_attn / (0.15 * peak)
    )
    # memory-bound: the KD loss per micro-batch ([tokens, V] logits; the Triton kernels by default,
    # 344 bytes a logit with kd_backend=torch), the optimizer over every parameter
    kd_s = tokens * V * 16.5 / 3350e9
    torch_kd = step_estimate(dataclasses.replace(inp, kd_backend="torch"), asm)
    assert torch_kd.kd_s == pytest.approx(tokens * V * 344 / 3350e9)
    opt_s = student * 126 / 3350e9
    est = step_estimate(inp, asm)
    assert est.microbatches == 2 and est.bubble_fraction == 0 and est.dp_comm_s == 0
    assert est.kd_s == pytest.approx(kd_s) and est.optimizer_s == pytest.approx(opt_s)
    assert est.step_s == pytest.approx(2 * (micro_s + kd_s) + opt_s)
    assert est.mfu == pytest.approx(4 * 32 * 1_296_384 / est.step_s / peak)


def test_importing_the_planner_loads_no_framework():
    code = (
        "import sys, dms_megatron.plan; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'megatron', 'hydra', 'omegaconf'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_flops_match_the_trainer_metrics():
    from dms_megatron.training.metrics import retrofit_flops_per_token

    for name, seq in (("smollm2_135m", 2048), ("r1_distill_qwen_32b", 8192), ("qwen3_8b", 4096)):
        arch = _arch(name)
        inp = PlanInput(arch=arch, seq_length=seq)
        assert model_flops_per_token(inp) == pytest.approx(retrofit_flops_per_token(arch, seq))


def test_parameter_counts_of_presets():
    assert total_params(_arch("smollm2_135m")) == 134_515_008
    assert total_params(_arch("r1_distill_qwen_32b")) == 32_763_876_352


def test_memory_decreases_with_tp_pp_and_full_recompute():
    arch = _arch("llama3_8b")
    base = PlanInput(arch=arch, global_batch_size=64, seq_length=8192)
    worst = [make_plan(replace(base, tp=t)).worst.reserved for t in (1, 2, 4, 8)]
    assert worst == sorted(worst, reverse=True) and len(set(worst)) == 4
    worst = [make_plan(replace(base, pp=p)).worst.reserved for p in (1, 2, 4)]
    assert worst == sorted(worst, reverse=True) and len(set(worst)) == 3
    tp8 = replace(base, tp=8)
    none, sel, full = (make_plan(replace(tp8, recompute=r)).worst for r in ("none", "selective", "full"))
    assert full.allocated < none.allocated and full.activations < 0.1 * none.activations
    # FlexAttention stores no s^2 scores: core-attention recompute saves little (see the docstring)
    assert sel.activations < none.activations < 1.1 * sel.activations
    assert make_plan(replace(tp8, sequence_parallel=True)).worst.allocated < none.allocated


def test_first_stage_activations_do_not_shrink_with_pp():
    """1F1B: stage 0 holds pp micro-batches of L/pp layers, the same bytes as PP 1."""
    base = PlanInput(arch=_arch("llama3_8b"), global_batch_size=64, seq_length=4096, tp=8)
    acts = [stage_memory(replace(base, pp=p), Assumptions(), 0).activations for p in (1, 2, 4)]
    assert acts[0] == acts[1] == acts[2]
    last = stage_memory(replace(base, pp=4), Assumptions(), 3)
    assert last.in_flight == 1 and last.activations == acts[0] / 4


def test_optimizer_shards_scale_with_one_over_dp():
    base = PlanInput(arch=_arch("r1_distill_qwen_7b"), tp=4, global_batch_size=64)
    opt = {dp: stage_memory(replace(base, dp=dp), Assumptions(), 0).optimizer for dp in (1, 2, 8)}
    assert opt[1] == pytest.approx(2 * opt[2]) == pytest.approx(8 * opt[8])
    grads = {dp: stage_memory(replace(base, dp=dp), Assumptions(), 0).grads for dp in (1, 8)}
    assert grads[1] == grads[8]  # megatron DDP's fp32 main_grad buffer is not sharded


def test_adapter_mode_trains_only_adapters_with_self_teacher():
    full = stage_memory(_tiny(variant="adapter"), Assumptions(), 0)
    adapter = stage_memory(_tiny(variant="adapter", train_mode="adapter", teacher="self"), Assumptions(), 0)
    assert adapter.teacher_params == 0
    assert adapter.grads == 4 * 4 * (64 + 64 * 2)  # 4 layers of RMSNorm(h) + Linear(h -> Hkv), fp32
    assert adapter.student_params == full.student_params and adapter.grads < full.grads
    assert "adapter" in layer_activation_terms(_tiny(variant="adapter"))


def test_the_teacher_graph_adds_its_output_and_one_layer():
    """``teacher_graph``: the last stage holds one more logits shard (the graph's static output) and at
    most one layer's no-grad temporaries; an earlier stage one more hidden state instead of logits."""
    asm = Assumptions()
    for pp, stage, last in ((1, 0, True), (2, 0, False)):
        off = stage_memory(_tiny(pp=pp), asm, stage)
        on = stage_memory(_tiny(pp=pp, teacher_graph=True), asm, stage)
        tokens = 2 * 32
        output = tokens * _vocab_shard(_tiny()) * 2 if last else tokens * 64 * 2
        assert off.teacher_graph == 0
        assert on.teacher_graph == output + tokens * layer_activation_bytes(_tiny(), "none")
        assert on.allocated - off.allocated == pytest.approx(on.teacher_graph)
    with pytest.raises(ValueError, match="teacher=separate"):
        _tiny(variant="adapter", train_mode="adapter", teacher="self", teacher_graph=True)


def _vocab_shard(inp: PlanInput) -> int:
    return inp.padded_vocab // inp.tp


def test_smollm2_matches_the_measured_h100_peak():
    """The one GPU measurement (docs/results/2026-11-22_h100_trainer_smollm2/step_throughput.json):
    SmolLM2-135M, micro-batch 4 x 2048, full model, neuron: torch.cuda.max_memory_allocated 20.46 GiB."""
    inp = PlanInput(arch=_arch("smollm2_135m"), micro_batch_size=4, global_batch_size=8, seq_length=2048)
    allocated = make_plan(inp).worst.allocated / GIB
    assert allocated == pytest.approx(20.458, rel=0.05)


def test_invalid_inputs_fail_with_the_key():
    with pytest.raises(ValueError, match="global_batch_size"):
        _tiny(global_batch_size=6, dp=2)
    with pytest.raises(ValueError, match="recompute"):
        _tiny(recompute="some")
    with pytest.raises(ValueError, match="variant=adapter"):
        _tiny(train_mode="adapter")
    with pytest.raises(ValueError, match="Valid tp values"):
        _tiny(tp=3)
    with pytest.raises(ValueError, match="matmul_efficiency"):
        Assumptions(matmul_efficiency=0)


def test_plan_that_does_not_fit_names_settings_that_do():
    inp = PlanInput(
        arch=_arch("r1_distill_qwen_32b"), tp=8, pp=2, dp=16, global_batch_size=256, seq_length=8192
    )  # no SP: torch norms, full-sequence GEMM inputs
    plan = make_plan(inp)
    assert not plan.fits and plan.status == "does not fit"
    changes = [s.change for s in plan.suggestions]
    assert "parallel.recompute=full" in changes
    assert "parallel.sequence_parallel=true" in changes
    assert any(c.startswith("--norm fused") for c in changes)  # bf16 norm weights
    assert all(s.reserved_gib <= 79.6 for s in plan.suggestions)
    json.dumps(plan.to_dict())


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def cli():
    from dms_megatron.cli import plan

    return plan


def test_cli_32b_preset_fits_as_json(cli, capsys):
    assert cli.main(["experiment=r1_qwen_32b_cr8", "--nodes", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["input"]["dp"] == 16 and out["input"]["world_size"] == 256
    assert out["input"]["sequence_parallel"] and out["input"]["seq_length"] == 8192


def test_cli_refuses_with_exit_2_and_suggestions(cli, capsys):
    rc = cli.main(["experiment=r1_qwen_32b_cr8", "parallel.sequence_parallel=false", "--nodes", "32"])
    err = capsys.readouterr().err
    assert rc == 2 and "refused" in err and "parallel.recompute=full" in err
    assert cli.main(["model=r1_distill_qwen_32b", "--warn-only"]) == 0
    assert "warning" in capsys.readouterr().err


def test_cli_bad_input_exits_1(cli, capsys):
    assert cli.main(["experiment=r1_qwen_32b_cr8", "--nodes", "3"]) == 1
    assert "not a multiple" in capsys.readouterr().err
    assert cli.main(["parallel.tpp=2"]) == 1


def test_pairs_are_suggested_when_no_single_change_fits():
    inp = PlanInput(
        arch=_arch("r1_distill_qwen_32b"), tp=4, dp=64, global_batch_size=256, seq_length=32768
    )  # 256 GPUs, PP 1, no SP, 32K tokens per micro-batch
    plan = make_plan(inp)
    assert not plan.fits and plan.suggestions
    assert all(" + " in s.change for s in plan.suggestions)
    assert any("parallel.recompute=full" in s.change for s in plan.suggestions)


def test_tight_plans_warn(cli, capsys):
    # Qwen3-8B at TP 4 x DP 2, no SP, bf16 norms, 8K tokens: ~63 GiB; on a 68 GiB GPU that is tight
    args = ["model=qwen3_8b", "parallel.tp=4", "data.seq_length=8192", "parallel.global_batch_size=64"]
    assert cli.main([*args, "--dp", "2", "--norm", "fused", "--gpu-memory-gib", "68"]) == 0
    assert "warning" in capsys.readouterr().err


def test_saved_tensor_probe_counts_each_storage_once():
    """The probe behind benchmarks/activation_check.py: a storage saved twice or through a view counts
    once, parameters are excluded, and core attention's inputs and own tensors get their regions."""
    import torch

    from dms_megatron.training.activation_probe import SavedTensorProbe

    w = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)

    def core(q, k, v, bias):
        scores = q @ k.t() + bias  # saves q and k (core inputs); bias needs no grad
        return torch.sigmoid(scores) @ v  # saves sigmoid's output (internal) and v

    probe = SavedTensorProbe([w])
    with probe:
        h = x @ w  # saves x (layer) and w (a parameter: excluded)
        y = h.sin()  # saves h
        z = y.view(8, 4) * y.view(8, 4).detach()  # saves a view of y's storage, and y's detached view
        qk = h * 2  # a scalar product saves nothing: first saved by the core
        out = probe.wrap_core(core)(qk[:, :4], qk[:, 4:], y, torch.zeros(4, 4))
    totals = probe.totals()
    assert totals["layer"] == (x.numel() + h.numel() + y.numel()) * 4  # y's storage once
    assert totals["core_input"] == qk.numel() * 4  # q and k: views of one storage; v (y) counted before
    assert totals["core_internal"] == 4 * 4 * 4  # sigmoid output [4, 4] fp32
    assert sum(r["count"] for r in probe.table()) == 5
    (out.sum() + z.sum()).backward()
    assert x.grad is not None
