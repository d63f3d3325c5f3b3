"""``benchmarks/step_throughput.py`` end to end on CPU (one rank's shapes of a TP=2 debug model, random
weights): the retrofit step, a variant, and both vanilla steps (megatron's vocabulary-parallel loss)
are timed on the same batches and the report's ratios are those of its medians."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_retrofit_variant_and_vanilla_steps_are_timed(tmp_path) -> None:
    out = tmp_path / "steps.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
        str(ROOT / "benchmarks" / "step_throughput.py"), "--out", str(out), "--warmup", "1", "--measure", "2",
        "--emulate-tp", "2", "--layers", "2", "--vocab", "128",
        "--dms-variant", "no_noise=dms.train_noise=false",
        "model=debug_qwen2", "model.dtype=fp32", "data.seq_length=64", "parallel.micro_batch_size=1",
        "parallel.global_batch_size=2", "dms.window=4", "dms.target_cr=2", "dms.cr_context=64",
        "dms.attention_backend=reference", "train.steps=10", "dms.cr_ramp_steps=5",
        f"run_dir={tmp_path / 'run'}", "logging.wandb_project=null",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    medians = {}
    for name in ("dms_retrofit", "no_noise", "vanilla", "vanilla_sdpa"):
        run = report[name]
        assert len(run["step_s_all"]) == 2 and all(t > 0 for t in run["step_s_all"]), name
        medians[name] = run["step_s_median"]
        assert math.isfinite(run["tokens_per_s"]) and run["tokens_per_s"] > 0, name
    for vanilla in ("vanilla", "vanilla_sdpa"):
        assert report[f"dms_over_{vanilla}_step_time"] == pytest.approx(
            medians["dms_retrofit"] / medians[vanilla]
        )
    assert report["no_noise_over_dms_retrofit_step_time"] == pytest.approx(
        medians["no_noise"] / medians["dms_retrofit"]
    )
