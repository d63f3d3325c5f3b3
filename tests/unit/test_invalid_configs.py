"""Every setting that cannot work is refused when the config is validated (before any process group or
model), with a ValueError naming the key; every shipped preset still validates."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dms_megatron.config import RetrofitConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def _compose(*overrides: str) -> RetrofitConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose(config_name="retrofit", overrides=list(overrides))
    return RetrofitConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))


# (Hydra overrides, what the error must say, world size to check or None)
INVALID = [
    # dms.* values
    (["dms.variant=qneuron"], r"dms\.variant=", None),
    (["dms.decisions_per=token"], r"dms\.decisions_per=", None),
    (["dms.window=-1"], r"dms\.window=-1 is invalid", None),
    (["dms.window=2.5"], r"dms\.window=2\.5 is invalid: expected an integer", None),
    (["dms.tau=0.0"], r"dms\.tau=", None),
    (["dms.logit_scale=-1.0"], r"dms\.logit_scale=", None),
    (["dms.kl_direction=forward"], r"dms\.kl_direction=", None),
    (["dms.kl_temperature=0"], r"dms\.kl_temperature=", None),
    (["dms.compression_loss=sum"], r"dms\.compression_loss=", None),
    (["dms.compression_weight=-0.1"], r"dms\.compression_weight=", None),
    (["dms.cr_start=0.5"], r"dms\.cr_start=", None),
    (["dms.target_cr=0.9"], r"dms\.target_cr=", None),
    (["dms.cr_ramp_steps=-5"], r"dms\.cr_ramp_steps=", None),
    (["dms.attention_backend=cudnn"], r"dms\.attention_backend=", None),
    (["dms.teacher_mode=yes"], r"dms\.teacher_mode=", None),
    (["dms.seed=-1"], r"dms\.seed=", None),
    (["dms.target_cr=16", "dms.window=512"], r"dms\.target_cr=16", None),  # the window alone exceeds it
    # settings that cannot work together
    (["train.steps=500"], r"dms\.cr_ramp_steps=700 .*lower dms\.cr_ramp_steps or raise train\.steps", None),
    (["experiment=smollm2_cr8", "train.steps=100"], r"dms\.cr_ramp_steps=400 .*train\.steps=100", None),
    (["dms=adapter", "train=adapter", "train.steps=100"], r"dms\.cr_ramp_steps=510", None),
    (["dms.window=2048", "dms.cr_context=0"], r"dms\.window=2048 .*seq_length=2048.*evicted", None),
    (["data.seq_length=128"], r"dms\.window=256 is invalid with data\.seq_length=128", None),
    (["train=adapter"], "train.mode=adapter", None),
    # layout
    (["model=r1_distill_qwen_7b", "parallel.tp=8"], "Valid tp values", None),
    (["parallel.global_batch_size=6", "parallel.micro_batch_size=4"], "not a multiple", None),
    (["parallel.sequence_parallel=true"], "needs parallel.tp > 1", None),
    (["parallel.recompute=some"], "parallel.recompute=.some. is invalid", None),
    (["parallel.tp=0"], r"parallel\.tp=0 is invalid", None),
    (["experiment=r1_qwen_32b_cr8"], r"world size 24 is not a multiple of parallel\.tp x parallel\.pp", 24),
    (["parallel.global_batch_size=8"], r"global_batch_size=8 is not a multiple of .* x 3", 3),
    # train.*, data.*, logging.*, model.*, unknown keys
    (["train.warmup_steps=-1"], "warmup_steps", None),
    (["train.steps=0"], r"train\.steps=0 is invalid", None),
    (["train.lr=1e-5", "train.min_lr=1e-4"], r"need lr > 0 and 0 <= min_lr <= lr", None),
    (["train.mode=lora"], r"train\.mode=.lora. is invalid", None),
    (["train.adapter_lr_mult=0"], r"train\.adapter_lr_mult=0", None),
    (["train.teacher_cuda_graph=true"], r"teacher_cuda_graph=true needs dms\.attention_backend=triton", None),
    (
        ["train.teacher_cuda_graph=true", "dms.attention_backend=triton", "train=adapter", "dms=adapter"],
        r"teacher_cuda_graph=true needs train\.mode=full",
        None,
    ),
    (
        ["train.teacher_cuda_graph=true", "dms.attention_backend=triton", "parallel.tp=3"],
        r"teacher_cuda_graph=true needs parallel\.tp=1",
        None,
    ),
    (["data.prefixes=[a,b]", "data.weights=[1.0]"], "data.weights", None),
    (["data.prefixes=[a]", "data.weights=[-1.0]"], r"data\.weights=\[-1\.0\] must all be > 0", None),
    (["logging.log_interval=0"], r"logging\.log_interval=0 is invalid", None),
    (["+train.bogus=1"], r"train\.bogus", None),
    (["model.dtype=int8"], "model.dtype", None),
]


@pytest.mark.parametrize(("overrides", "match", "world_size"), INVALID, ids=lambda v: None)
def test_invalid_config_is_refused(overrides, match, world_size) -> None:
    with pytest.raises(ValueError, match=match):
        cfg = _compose(*overrides)
        if world_size is not None:
            cfg.check_world_size(world_size)
        pytest.fail(f"{overrides} was accepted")


def test_enough_invalid_cases() -> None:
    assert len(INVALID) >= 30


def test_unknown_override_key_is_rejected_by_hydra() -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        _compose("train.stepz=3")


@pytest.mark.parametrize("name", PRESETS)
def test_every_shipped_preset_validates(name) -> None:
    """As shipped (no override): each preset's ramp fits its steps and its window its sequences."""
    cfg = _compose(f"experiment={name}")
    assert cfg.dms.fade_steps + cfg.dms.cr_ramp_steps <= cfg.train.steps  # the ramp ends inside the run
    assert cfg.dms.window < cfg.data.seq_length
    nodes_gpus = {"r1_qwen_32b_cr8": 32 * 8, "qwen3_8b_cr8": 8}.get(name, 1)  # slurm/*.sh headers
    cfg.check_world_size(nodes_gpus)


def test_presets_list_is_complete() -> None:
    assert {"smollm2_cpu_demo", "r1_qwen_32b_cr8", "qwen3_8b_cr8"} <= set(PRESETS) and len(PRESETS) >= 6
