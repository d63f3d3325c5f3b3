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
