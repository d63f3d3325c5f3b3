"""The retrofit trainer end to end on CPU (gloo): a tiny Llama imported from HF, trained by
``run_retrofit`` with megatron's schedules, DDP and distributed optimizer.

Contracts: TP=2 (with and without sequence parallelism), PP=2 and full recompute reproduce the TP=1
loss curve; a run preempted (SIGUSR1) and resumed gives exactly the losses of an uninterrupted run, also
when the signal comes during setup; a checkpoint saved at TP=1 resumes at TP=2; the achieved CR follows
the target; the run directory holds config, run info, metrics, plot and summary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import convert_jobs
import pytest
import trainer_jobs
from runner import run_distributed

KEYS = ("loss/kd", "loss/compression", "cr/decision_rate", "grad_norm", "lr")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("trainer")
    # peaked next-token distributions (std 0.06 weights), so that evicting context costs KD
    hf = convert_jobs.make_tiny_hf("llama", root / "hf", seed=3, initializer_range=0.06)
    ckpt = root / "ckpt"
    run_distributed(convert_jobs.import_job, 1, str(hf), str(ckpt), 1, 1, None, False)
    trainer_jobs.write_random_dataset(str(root / "data" / "rand"))
    hf_config = json.loads((hf / "config.json").read_text())
    return {"root": str(root), "ckpt": str(ckpt), "data": str(root / "data" / "rand"), "hf_config": hf_config}


def _run(
    assets,
    name: str,
    world: int,
    preempt_after: int | None = None,
    profile_step: int | None = None,
    **sections,
) -> dict:
    run_dir = str(Path(assets["root"]) / name)
    cfg = trainer_jobs.tiny_config(run_dir, assets["ckpt"], assets["data"], assets["hf_config"], **sections)
    results = run_distributed(trainer_jobs.retrofit_job, world, cfg, preempt_after, profile_step, timeout=600)
    return next(r for r in results if r["metrics"] is not None)  # the logging rank's view


def _curve(metrics: list[dict]) -> list[tuple[float, ...]]:
    return [tuple(m[k] for k in KEYS) for m in metrics]


@pytest.fixture(scope="module")
def reference(assets) -> dict:
    return _run(assets, "tp1", 1, profile_step=2)  # the profiler only watches: the curve is the same


def test_run_directory(reference, assets) -> None:
    run = Path(assets["root"]) / "tp1"
    summary = reference["summary"]
    assert summary["finished"] and summary["step"] == 6 and not summary["preempted"]
    assert [m["step"] for m in reference["metrics"]] == [1, 2, 3, 4, 5, 6]
    info = json.loads((run / "run_info.json").read_text())
    assert info["git_sha"] and info["versions"]["megatron-core"] == "0.19.2" and info["command"]
    assert "dms:" in (run / "config.yaml").read_text()
    assert (run / "cr_curve.png").stat().st_size > 0
    saved = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("iter_"))
    assert saved == ["iter_0000003", "iter_0000006"]
    meta = json.loads((run / "checkpoints" / "iter_0000006" / "dms_megatron.json").read_text())
    assert meta["trained_cr"] == pytest.approx(summary["cr_memory"]) and meta["dms"]["variant"] == "adapter"
    losses = [m["loss/kd"] for m in reference["metrics"]]
    # the zero-initialised adapter starts as the teacher (logit -offset): only noise-driven evictions
    assert 0 < losses[0] < 1e-2
    assert reference["metrics"][-1]["cr/decision_rate"] > reference["metrics"][0]["cr/decision_rate"]


@pytest.mark.parametrize(
    ("name", "world", "parallel"),
    [
        ("tp2", 2, {"tp": 2}),
        ("tp2sp", 2, {"tp": 2, "sequence_parallel": True}),
        ("pp2", 2, {"pp": 2}),
        ("recompute_full", 1, {"recompute": "full"}),
    ],
)
def test_layouts_match_tp1(reference, assets, name, world, parallel) -> None:
    got = _run(assets, name, world, parallel=parallel)
    for ref, new in zip(_curve(reference["metrics"]), _curve(got["metrics"]), strict=True):
        assert new == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_recompute_setting_reaches_the_student_only(assets) -> None:
    """parallel.recompute maps to megatron's settings on the student; the teacher (no grad) keeps none."""
    cfg = trainer_jobs.tiny_config(
        str(Path(assets["root"]) / "rc"), assets["ckpt"], assets["data"], assets["hf_config"]
    )
    cfg["train"]["mode"] = "full"  # a separate teacher
    (got,) = run_distributed(trainer_jobs.recompute_settings_job, 1, cfg, ["none", "selective", "full"])
    student = {mode: got[mode]["student"] for mode in got}
    assert student["none"]["recompute_granularity"] is None
    assert (student["selective"]["recompute_granularity"], student["selective"]["recompute_modules"]) == (
        "selective",
        ["core_attn"],
    )
    assert [
        student["full"][k] for k in ("recompute_granularity", "recompute_method", "recompute_num_layers")
    ] == [
        "full",
        "uniform",
        1,
    ]
    assert all(got[mode]["teacher"]["recompute_granularity"] is None for mode in got)


def test_adapter_lr_mult_gives_the_adapters_their_own_rates(assets) -> None:
    """train.adapter_lr_mult: in a full-model run the adapters' group follows lr x mult, the rest lr."""
    cfg = trainer_jobs.tiny_config(
        str(Path(assets["root"]) / "lr"), assets["ckpt"], assets["data"], assets["hf_config"]
    )
    cfg["train"] |= {"mode": "full", "lr": 1e-4, "min_lr": 1e-5, "adapter_lr_mult": 20.0, "warmup_steps": 0}
    cfg["dms"]["variant"] = "adapter"
    (groups,) = run_distributed(trainer_jobs.optimizer_groups_job, 1, cfg)
    by_rate: dict[float, int] = {}
    for g in groups:
        assert g["lr"] <= g["max_lr"] and g["lr"] > 0.9 * g["max_lr"]  # one step into the cosine decay
        by_rate[round(g["max_lr"], 12)] = by_rate.get(round(g["max_lr"], 12), 0) + g["numel"]
    assert set(by_rate) == {1e-4, 2e-3}
    assert 0 < by_rate[2e-3] < by_rate[1e-4]  # the adapters: a few parameters per layer


@pytest.mark.parametrize(
    ("train", "nan_steps", "error"),
    [
        ({}, [1], None),  # skipped, logged, the run goes on (steps here 0-based, messages 1-based)
        (
            {"on_nonfinite": "stop"},
            [1],
            (
                "step 2: NaN/Inf in the loss or gradients (rank 0: loss of micro-batch",
                "(train.on_nonfinite=stop)",
            ),
        ),
        (
            {"max_nonfinite_skips": 1},
            [1, 2],
            ("step 3: NaN/Inf", "(2 in a row, train.max_nonfinite_skips=1)"),
        ),
    ],
    ids=["skip", "stop", "too_many_skips"],
)
def test_nonfinite_loss_is_skipped_or_stops_the_run(assets, train, nan_steps, error) -> None:
    cfg = trainer_jobs.tiny_config(
        str(Path(assets["root"]) / f"nan{len(train)}{len(nan_steps)}"),
        assets["ckpt"],
        assets["data"],
        assets["hf_config"],
    )
    cfg["train"] |= {"steps": 4, **train}
    cfg["dms"]["cr_ramp_steps"] = 2
    (got,) = run_distributed(trainer_jobs.nonfinite_job, 1, cfg, nan_steps)
    if error is None:
        assert got["error"] is None
        rows = got["metrics"]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        assert [r["train/skipped"] for r in rows] == [0.0, 1.0, 0.0, 0.0]
        assert all(math.isfinite(r["loss/kd"]) for r in rows if r["step"] != 2)
    else:
        assert all(part in got["error"] for part in error), got["error"]
        assert "the last checkpoint is the last good state" in got["error"]
        assert [r["step"] for r in got["metrics"] or []] == list(range(1, nan_steps[-1] + 1))


def test_resume_equals_uninterrupted(reference, assets) -> None:
    first = _run(assets, "resumed", 1, preempt_after=2)
    assert first["summary"]["preempted"] and first["summary"]["step"] == 2
    second = _run(assets, "resumed", 1)
    assert second["summary"]["resumed_from_step"] == 2 and second["summary"]["finished"]
    assert _curve(second["metrics"]) == _curve(reference["metrics"])  # bit-identical


def test_signal_during_setup_stops_before_training(reference, assets) -> None:
    """Slurm's warning may come while the models are built or a checkpoint loads: the run must not die
    (the guard is already in place), must stop before the first step, and the next attempt must train
    everything."""
    run_dir = str(Path(assets["root"]) / "early")
    cfg = trainer_jobs.tiny_config(run_dir, assets["ckpt"], assets["data"], assets["hf_config"])
    first = run_distributed(trainer_jobs.retrofit_job, 2, cfg, 0, timeout=600)
    for result in first:
        summary = result["summary"]
        assert summary["preempted"] and not summary["finished"] and summary["step"] == 0, summary
        assert summary["checkpoint"] is None
    assert not (Path(run_dir) / "checkpoints" / "latest_checkpointed_iteration.txt").exists()
    second = _run(assets, "early", 1)
    assert second["summary"]["finished"] and second["summary"]["resumed_from_step"] == 0
    assert _curve(second["metrics"]) == _curve(reference["metrics"])


def test_resume_at_another_tp(reference, assets) -> None:
    first = _run(assets, "reshard", 1, preempt_after=3)
    assert first["summary"]["step"] == 3
    second = _run(assets, "reshard", 2, parallel={"tp": 2})
    assert second["summary"]["resumed_from_step"] == 3
    for ref, new in zip(_curve(reference["metrics"]), _curve(second["metrics"]), strict=True):
        assert new == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_full_mode_cr_follows_target(assets) -> None:
    """The compression loss is the one-sided hinge relu(target - achieved) of the paper: the achieved CR
    must rise to the target as it ramps (and may exceed it where eviction costs little KD, as on this tiny
    random model); without the compression loss it stays where it started."""
    train = {"mode": "full", "steps": 40, "lr": 3e-3, "min_lr": 3e-3, "save_interval": 40}
    got = _run(assets, "track", 1, train=train, dms={"target_cr": 2.5, "cr_ramp_steps": 15})
    achieved = [m["cr/decision_rate"] for m in got["metrics"]]
    print("achieved CR per step:", [round(a, 2) for a in achieved])
    assert achieved[0] < 1.3  # starts near no eviction
    assert all(a >= 0.9 * 2.5 for a in achieved[26:]), achieved[26:]  # ramp done at 15, settled by 26
    assert sum(m["loss/compression"] for m in got["metrics"][26:]) / 14 < 0.02
    control = _run(
        assets,
        "control",
        1,
        train=train,
        dms={"target_cr": 2.5, "cr_ramp_steps": 15, "compression_weight": 0.0},
    )
    assert max(m["cr/decision_rate"] for m in control["metrics"]) < 1.4


def test_neuron_fade_starts_at_the_teacher(assets) -> None:
    """Neuron variant with a channel fade: the first step's student is the teacher (KD ~ 0: the channel is
    fully kept and eviction is off, up to rare noise-driven decisions); the CR ramp waits for the fade; the
    paper's start (no fade) removes the channel and evicts from step 1."""
    dms = {"variant": "neuron", "logit_scale": 100.0, "logit_offset": 8.0}
    dms |= {"target_cr": 2.0, "cr_ramp_steps": 2}
    train = {"mode": "full", "steps": 6, "save_interval": 6}
    faded = _run(assets, "fade", 1, train=train, dms={**dms, "neuron_fade_steps": 3})["metrics"]
    paper = _run(assets, "nofade", 1, train=train, dms={**dms, "neuron_fade_steps": 0})["metrics"]
    print("KD at step 1, faded vs paper:", faded[0]["loss/kd"], paper[0]["loss/kd"])
    assert faded[0]["loss/kd"] < 1e-4 and paper[0]["loss/kd"] > 1e-3  # measured 4e-6 vs 9e-3
    assert [m["cr/target"] for m in faded[:4]] == [1.0, 1.0, 1.0, 1.0] and faded[4]["cr/target"] > 1.0
    assert faded[3]["cr/decision_rate"] < 1.05  # rows zeroed at the fade's end: logits start at -offset


def test_profiled_step_names_its_regions_and_syncs_the_host_only_outside_forward_backward(reference) -> None:
    """``step_profile.profile_steps`` over step 3 of the reference run: every named region took time, the
    regions and the backward add up to the step, and no ``.item()``-style host sync happens inside the
    forward/backward (per layer or per micro-batch: the THD RoPE and document ids are built without
    one). The run's curve is the one every layout test compares against."""
    from dms_megatron.training.step_profile import FORWARD_REGIONS, OUTSIDE_REGIONS

    prof = reference["profile"]
    regions = prof["regions_ms"]
    assert all(regions[k] > 0 for k in (*FORWARD_REGIONS, *OUTSIDE_REGIONS)), regions
    assert sum(regions.values()) == pytest.approx(prof["total_ms"])
    assert prof["forward_backward_ms"] > regions["dms.teacher_forward"] + regions["dms.student_forward"]
    assert prof["backward_nodes_ms"] and prof["top_ops_self_ms"]
    inside = ("dms.forward_backward", *FORWARD_REGIONS)
    assert not [k for k in prof["host_syncs_per_step"] if k.endswith(inside)], prof["host_syncs_per_step"]


def test_max_over_ranks_gives_every_rank_the_largest_value() -> None:
    """The peak memory over ranks the step loop logs (``memory/max_allocated_gb_any_rank``)."""
    assert run_distributed(trainer_jobs.max_over_ranks_job, 2) == [2.5, 2.5]
