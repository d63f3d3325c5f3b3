"""FLOP accounting, memory-CR metrics, JSONL + W&B (offline) logging and the CR plot."""

from __future__ import annotations

import os

import pytest

from dms_megatron.config import DMSConfig
from dms_megatron.core.losses import CRSchedule, decision_cr_for_memory, max_memory_cr, memory_cr
from dms_megatron.families import load_model_preset
from dms_megatron.training.metrics import (
    MetricsLogger,
    cr_metrics,
    forward_flops_per_token,
    plot_cr_curve,
    read_metrics,
    retrofit_flops_per_token,
    throughput,
)


def test_forward_flops_by_hand_for_smollm2():
    arch, _ = load_model_preset("smollm2_135m")
    s = 2048
    # per layer: q 576x576, k/v 576x192 each, o 576x576, MLP 3 x 576x1536, attention 2 x 576 x (s+1)/2
    proj = 576 * 576 + 2 * 576 * 192 + 576 * 576
    mlp = 3 * 576 * 1536
    attn = 2 * 576 * (s + 1) / 2
    want = 30 * 2 * (proj + mlp + attn) + 2 * 576 * 49152
    assert forward_flops_per_token(arch, s) == pytest.approx(want)
    assert retrofit_flops_per_token(arch, s) == pytest.approx(4 * want)
    # sanity: ~2 x non-embedding params + attention + logits (134.5M params, 28.3M of them embeddings)
    assert 2 * 106e6 < forward_flops_per_token(arch, s) < 2 * 135e6 + 2 * 576 * s * 30


def test_throughput_and_mfu():
    t = throughput(tokens=1_000_000, seconds=10.0, flops_per_token=1e9, num_gpus=8, peak_tflops=1000.0)
    assert (
        t.tokens_per_s == 100_000
        and t.tflops_per_gpu == pytest.approx(12.5)
        and t.mfu == pytest.approx(0.0125)
    )


def test_memory_cr():
    # 32K tokens, window 512 (513 always kept), decision-rate CR 16 -> about 13x (docs/dms.md section 8)
    assert memory_cr(16.0, 32768, 512) == pytest.approx(32768 / (513 + (32768 - 513) / 16), rel=1e-12)
    assert 12.5 < memory_cr(16.0, 32768, 512) < 13.5
    assert memory_cr(8.0, 100, 200) == 1.0  # all within the window
    assert memory_cr(1.0, 4096, 64) == pytest.approx(1.0)


@pytest.mark.parametrize("target,context,window", [(4.0, 8192, 256), (8.0, 8192, 64), (2.0, 2048, 256)])
def test_decision_cr_for_memory_inverts_memory_cr(target, context, window):
    decision = decision_cr_for_memory(target, context, window)
    assert decision > target  # the always-kept window makes the decisions work harder
    assert memory_cr(decision, context, window) == pytest.approx(target, rel=1e-12)
    assert decision_cr_for_memory(1.0, context, window) == 1.0


def test_unreachable_memory_cr_is_a_clear_error():
    assert max_memory_cr(8192, 511) == 16.0
    with pytest.raises(ValueError, match="out of reach with window 512"):
        decision_cr_for_memory(16.0, 8192, 512)
    with pytest.raises(ValueError, match=r"dms.target_cr=16.0 is invalid: memory CR 16 at 8192 tokens"):
        DMSConfig(window=512, target_cr=16.0, cr_context=8192)
    DMSConfig(window=512, target_cr=16.0, cr_context=0)  # a decision rate: fine


def test_schedule_targets_memory_after_the_fade():
    s = CRSchedule(end_cr=4.0, ramp_steps=100, delay_steps=50, context=8192, window=256)
    assert s.cr(0) == s.cr(50) == 1.0 and s.target_fraction(49) == 0.0
    assert s.cr(100) == pytest.approx(2.5) and s.cr(150) == s.cr(1000) == 4.0
    assert memory_cr(s.decision_cr(150), 8192, 256) == pytest.approx(4.0)
    cfg = DMSConfig(variant="neuron", neuron_fade_steps=30, target_cr=4.0, cr_ramp_steps=10)
    assert cfg.schedule.delay_steps == 30 and DMSConfig(variant="adapter").schedule.delay_steps == 0
    m = cr_metrics(s.decision_cr(150), s.decision_cr(150), 4.0, DMSConfig(target_cr=4.0), 2048)
    assert m["cr/memory"] == pytest.approx(4.0) and m["cr/memory_train_len"] < m["cr/memory"]
    assert m["cr/decision_rate"] == m["cr/decision_target"] > 4.0


def test_logger_writes_jsonl_wandb_offline_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLogger(tmp_path, wandb_project="dms-test", run_name="unit", group="g", config={"a": 1})
    for step in range(5):
        target = 1 + step
        log.log(
            step,
            {
                "loss/kd": 1.0 / (step + 1),
                "loss/compression": 0.1,
                "cr/target": target,
                "cr/memory": target * 0.9,
                "cr/memory_train_len": target * 0.8,
                "cr/decision_rate": target * 1.2,
            },
            rates=[[0.1 * step, 0.2], [0.3, 0.4]],
        )
    log.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(5)) and rows[3]["cr/target"] == 4
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(p.suffix == ".wandb" for p in runs[0].iterdir())
    png = plot_cr_curve(tmp_path / "metrics.jsonl", tmp_path / "cr.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 5000
    with pytest.raises(ValueError, match="no cr/target"):
        (tmp_path / "empty.jsonl").write_text("")
        plot_cr_curve(tmp_path / "empty.jsonl", tmp_path / "x.png")
