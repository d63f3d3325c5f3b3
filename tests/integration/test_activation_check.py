"""The planner's per-layer activation bytes against what autograd really saves in our megatron layer
(``benchmarks/activation_check.py`` on CPU): every term outside core attention -- norms (torch's
composite path on CPU), GEMM inputs, RoPE tables, SwiGLU copies, the DMS adapter, qk-norm and the
decision sigmoid -- for the neuron and adapter variants, Qwen2 and Qwen3. A change in megatron or torch
that saves more (or less) shows up here before it surprises a cluster run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=debug_qwen2"],
        ["model=debug_qwen3", "dms=adapter"],
    ],
    ids=["qwen2-neuron", "qwen3-adapter"],
)
def test_planner_matches_saved_tensors_outside_core_attention(tmp_path, overrides) -> None:
    out = tmp_path / "check.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "activation_check.py"),
        "--out",
        str(out),
        "--work",
        str(tmp_path / "work"),
        "--layers",
        "1",
        "3",
        "--emulate-tp",
        "2",
        "--vocab",
        "256",
        "data.seq_length=256",
        "dms.window=64",  # below the sequence length (a window >= it is refused)
        "model.dtype=bf16",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["layers"] == [1, 3]
    assert report["planner"]["equals_tp_layout"]  # one rank of TP=2 == the emulated layer at TP=1
    per_layer = report["measured_saved_bytes_per_token_per_layer"]
    assert per_layer["core_internal"] > 0  # the reference backend's own tensors, not compared
    check = report["outside_core"]
    # exact up to a few per-layer constants (the neuron mask, the decision shift): < 2 bytes per token
    assert check["measured"] == pytest.approx(check["planner"], abs=2.0), report["runs"]["3"]
    # --replan recomputes the planner side from the stored runs alone and gives the same report
    again = tmp_path / "replanned.json"
    cmd = [sys.executable, cmd[1], "--replan", str(out), "--out", str(again)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    replanned = json.loads(again.read_text())
    assert replanned["outside_core"] == report["outside_core"] and replanned["planner"] == report["planner"]


def _load_check_module():
    import importlib.util

    path = ROOT / "benchmarks" / "activation_check.py"
    spec = importlib.util.spec_from_file_location("activation_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_splits_allocator_growth_into_static_and_activations() -> None:
    """The CUDA part of the report, from two synthetic depths: static growth (allocated before the step)
    and transient growth (peak minus that) per layer, each against its own planner term."""
    check = _load_check_module()
    gib = 2**30

    def run(layers: int, static_gib: float, act_gib: float) -> dict:
        before = (1.0 + static_gib * layers) * gib  # 1 GiB that does not grow with depth
        return {
            "tokens": 1024,
            "saved_bytes": dict(layer=100 * layers * 1024, core_input=0, core_other=0, core_internal=7),
            "backend": "flex",
            "device": "fake-gpu",
            "recompute": "full",
            "allocated_before_step": before,
            "max_allocated": before + (0.5 + act_gib * layers) * gib,
        }

    runs = {2: run(2, 1.25, 0.5), 6: run(6, 1.25, 0.5)}
    plan = {"resident_bytes_per_token": 0.25 * gib / 1024, "static_bytes_per_layer": 1.0 * gib}
    args = type("Args", (), {"emulate_tp": 8, "vocab": 4096})()
    report = check.build_report(args, ["parallel.recompute=full"], runs, plan)
    assert report["recompute"] == "full" and report["layers"] == [2, 6]
    assert "outside_core" not in report  # saved bytes are not compared under recompute
    assert report["measured_saved_bytes_per_token_per_layer"]["layer"] == pytest.approx(100.0)
    static, act = report["static_growth_per_layer_gib"], report["activation_growth_per_layer_gib"]
    assert static == pytest.approx({"measured": 1.25, "planner": 1.0, "ratio": 1.25})
    assert act == pytest.approx({"measured": 0.5, "planner": 0.25, "ratio": 2.0})
    assert report["peak_growth_per_layer_gib"]["ratio"] == pytest.approx(1.75 / 1.25)
