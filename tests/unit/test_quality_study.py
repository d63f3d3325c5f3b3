"""The recipe study's choice of which runs get the (slow) pass-key evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.benchmark_module import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def study():
    return load_benchmark("quality_study")


def _results(rows: dict[str, tuple[float, float]], length: int = 8192) -> dict:
    table = {"teacher": {"perplexity": 30.0}}
    table |= {f"dms:{n}": {"memory_cr": cr, "kl_to_teacher": kl} for n, (cr, kl) in rows.items()}
    return {"tasks": {f"perplexity_{length}": table}}


def test_winner_per_target_is_the_lowest_kl_that_reaches_the_target(study):
    rows = {
        "cr4_adapter_w256_long": (4.7, 0.018),
        "cr4_adapter_w256": (4.29, 0.017),
        "cr8_adapter_w256_seq8k": (8.2, 0.030),
        "cr8_adapter_full_seq8k": (7.9, 0.020),  # lower KL, but short of CR 8: not chosen
        "cr8_adapter_seq4k_lr5e-4": (8.1, 0.033),
    }
    assert study.winners(_results(rows), list(rows)) == ["cr4_adapter_w256", "cr8_adapter_w256_seq8k"]


def test_without_a_run_at_the_target_the_most_compressed_is_chosen(study):
    rows = {"cr8_adapter_w256_seq8k": (7.6, 0.030), "cr8_adapter_full_seq8k": (7.9, 0.040)}
    assert study.winners(_results(rows), list(rows)) == ["cr8_adapter_full_seq8k"]


def test_without_measurements_every_run_is_kept(study):
    names = ["cr4_adapter_w256_long", "cr8_adapter_w256_seq8k"]
    assert study.winners(None, names) == names
    assert study.winners(_results({"cr4_adapter_w256_long": (4.7, 0.018)}, length=2048), names) == names


def test_every_run_builds_a_valid_retrofit_config(study):
    """Each recipe's overrides (as the study passes them, the last value of a key winning) give a
    config the trainer accepts: e.g. a 2K-sequence run must not keep the preset's 4 x 4096 batch."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dms_megatron.config import RetrofitConfig

    with initialize_config_dir(str(ROOT / "dms_megatron" / "configs"), version_base=None):
        for name in study.RUNS:
            last = {}
            for o in study._overrides(name):
                key, value = o.split("=", 1)
                last[key] = value
            cfg = compose("retrofit", overrides=[f"{k}={v}" for k, v in last.items()])
            RetrofitConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))


@pytest.mark.parametrize(
    ("preset_name", "run"),
    [("smollm2_cr4", "cr4_adapter_w256_long"), ("smollm2_cr8", "cr8_full_seq8k_t9_900")],
)
def test_the_presets_are_the_measured_study_runs(study, preset_name, run):
    """``experiment=smollm2_cr4`` / ``smollm2_cr8`` train what their study runs measured
    (docs/benchmarks.md): the same recipe, schedule, batch and learning rates (save / logging aside)."""
    from hydra import compose, initialize_config_dir

    def last(overrides):
        out = {}
        for o in overrides:
            key, value = o.split("=", 1)
            out[key] = value
        return [f"{k}={v}" for k, v in out.items()]

    keys = [
        ("dms", "variant"), ("dms", "window"), ("dms", "target_cr"), ("dms", "cr_context"),
        ("dms", "cr_ramp_steps"), ("train", "mode"), ("train", "steps"), ("train", "lr"),
        ("train", "min_lr"), ("train", "warmup_steps"), ("data", "seq_length"), ("data", "prefixes"),
        ("parallel", "micro_batch_size"), ("parallel", "global_batch_size"), ("train", "adapter_lr_mult"),
    ]  # fmt: skip
    with initialize_config_dir(str(ROOT / "dms_megatron" / "configs"), version_base=None):
        measured = compose("retrofit", overrides=last(study._overrides(run)))
        preset = compose("retrofit", overrides=[f"experiment={preset_name}"])
    for group, key in keys:
        assert preset[group][key] == measured[group][key], (group, key)


@pytest.mark.parametrize("several", [False, True])
def test_one_checkpoint_json_keeps_its_rows_with_or_without_label_suffixes(study, several):
    """``quality_cr<N>.json``: evaluate.py names rows ``dms:NAME`` / ``h2o@=dms:NAME`` when it evaluated
    several checkpoints and ``dms`` / ``h2o@=dms`` when it evaluated one; either way the file keeps the
    teacher, that checkpoint's DMS row, its matched baselines and the fixed-CR sweep rows."""
    names = ["a", "b"] if several else ["a"]
    suffix = {n: f":{n}" if several else "" for n in names}
    policies = ["teacher", "h2o@8"] + [f"{p}{suffix[n]}" for n in names for p in ("dms", "h2o@=dms")]
    results = {
        "policies": policies,
        "checkpoints": {n: f"exports/{n}" for n in names},
        "tasks": {"perplexity_8192": {p: {"kl_to_teacher": i} for i, p in enumerate(policies)}},
    }
    got = study._only(results, "a")
    assert got["policies"] == ["teacher", "h2o@8", "dms", "h2o@=dms"]
    table = got["tasks"]["perplexity_8192"]
    assert table["dms"] == results["tasks"]["perplexity_8192"][f"dms{suffix['a']}"]
    assert got["checkpoints"] == {"a": "exports/a"}
