"""Rank-side jobs for the trainer tests: a tiny imported Llama retrofitted by ``run_retrofit``."""

from __future__ import annotations

import os
import signal
from typing import Any

import torch

from dms_megatron.config import RetrofitConfig
from dms_megatron.families import load_model_preset

EOS = 2


def write_random_dataset(prefix: str, seed: int = 0, n_docs: int = 300) -> None:
    from dms_megatron.training.data import write_token_documents

    gen = torch.Generator().manual_seed(seed)
    docs = [
        torch.randint(3, 96, (int(torch.randint(4, 40, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(n_docs)
    ]
    write_token_documents(prefix, docs, 96, EOS, "random-test-tokens")


def tiny_config(
    run_dir: str, ckpt: str | None, data: str, hf_config: dict | None = None, **sections: dict[str, Any]
) -> dict[str, Any]:
    """A debug_llama-sized retrofit (4 layers, 2 KV heads), sequences of 32 tokens, 2 micro-batches per
    step. ``hf_config``: the imported model's config.json (default: the debug_llama preset)."""
    _, preset = load_model_preset("debug_llama")
    if hf_config is not None:
        preset = {**preset, "name": "tiny_llama", "hf_config": hf_config}
    cfg: dict[str, Any] = {
        "model": {**preset, "checkpoint": ckpt, "dtype": "fp32"},
        "dms": {
            "variant": "adapter",
            "window": 4,
            "logit_scale": 1.0,
            "logit_offset": 2.0,
            "tau": 0.5,
            "target_cr": 3.0,
            "cr_ramp_steps": 4,
            "cr_context": 0,  # decision-rate targets: the tests follow the decisions directly
            "attention_backend": "reference",
        },
        "parallel": {"micro_batch_size": 2, "global_batch_size": 4},
        "data": {"prefixes": [data], "seq_length": 32},
        "train": {"steps": 6, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "save_interval": 3},
        "logging": {"console": False},
        "run_dir": run_dir,
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def retrofit_job(
    rank: int,
    world: int,
    cfg: dict[str, Any],
    preempt_after: int | None = None,
    profile_step: int | None = None,
) -> dict:
    """Run a retrofit; ``preempt_after``: rank 0 sends itself SIGUSR1 after that many steps (0: while the
    models are being built, before the first step); ``profile_step``: that step runs under
    ``step_profile.profile_steps`` (its summary is returned as ``profile``)."""
    from dms_megatron.training import setup
    from dms_megatron.training.metrics import read_metrics
    from dms_megatron.training.run import run_retrofit
    from dms_megatron.training.step_profile import profile_steps
    from dms_megatron.training.trainer import RetrofitTrainer

    train_step = RetrofitTrainer.train_step
    profiles: list[dict] = []

    def profiled(self, step):
        if step != profile_step:
            return train_step(self, step)
        result: list[Any] = []
        profiles.append(profile_steps(lambda s: result.append(train_step(self, s)), step, 1))
        return result[0]

    RetrofitTrainer.train_step = profiled

    build_models = setup.build_models
    if preempt_after == 0 and rank == 0:

        def signalled_build(*args: Any, **kwargs: Any) -> Any:
            os.kill(os.getpid(), signal.SIGUSR1)
            return build_models(*args, **kwargs)

        setup.build_models = signalled_build

    def on_step(result: Any) -> None:
        if preempt_after is not None and rank == 0 and result.step + 1 == preempt_after:
            os.kill(os.getpid(), signal.SIGUSR1)

    try:
        summary = run_retrofit(RetrofitConfig.from_dict(cfg), cfg, ["test"], on_step=on_step)
    finally:
        setup.build_models = build_models  # the rank may run further jobs (runner's pool)
        RetrofitTrainer.train_step = train_step
    path = os.path.join(cfg["run_dir"], "metrics.jsonl")
    return {
        "summary": summary,
        "metrics": read_metrics(path) if os.path.isfile(path) else None,
        "profile": profiles[0] if profiles else None,
    }


def recompute_settings_job(rank: int, world: int, cfg: dict[str, Any], modes: list[str]) -> dict[str, Any]:
    """For each ``parallel.recompute`` mode: the megatron settings the student and teacher were built with."""
    from dms_megatron.training.run import preflight
    from dms_megatron.training.setup import build_models, init_distributed

    keys = ("recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules")
    out = {}
    for mode in modes:
        config = RetrofitConfig.from_dict({**cfg, "parallel": {**cfg["parallel"], "recompute": mode}})
        pre = preflight(config)
        init_distributed(config.parallel.tp, config.parallel.pp)
        models = build_models(config, pre.arch, pre.meta)
        out[mode] = {
            name: {k: getattr(m.config, k) for k in keys}
            for name, m in (("student", models.student), ("teacher", models.teacher))
        }
    return out


def optimizer_groups_job(rank: int, world: int, cfg: dict[str, Any]) -> list[dict[str, float]]:
    """Per optimizer parameter group after one scheduler step: its max_lr, lr and parameter count."""
    from dms_megatron.training.run import preflight
    from dms_megatron.training.setup import build_models, build_optimizer, init_distributed

    config = RetrofitConfig.from_dict(cfg)
    pre = preflight(config)
    init_distributed(config.parallel.tp, config.parallel.pp)
    models = build_models(config, pre.arch, pre.meta)
    optimizer, scheduler = build_optimizer(config, models.ddp)
    scheduler.step(1)
    return [
        {"max_lr": g["max_lr"], "lr": g["lr"], "numel": sum(p.numel() for p in g["params"])}
        for g in optimizer.param_groups
    ]


def nonfinite_job(rank: int, world: int, cfg: dict[str, Any], nan_steps: list[int]) -> dict:
    """A retrofit whose loss is NaN at ``nan_steps`` (injected in the trainer's loss): its metrics, or
    the error that stopped it."""
    from dms_megatron.training.metrics import read_metrics
    from dms_megatron.training.run import run_retrofit
    from dms_megatron.training.trainer import NonFiniteTrainingError, RetrofitTrainer

    original = RetrofitTrainer._loss

    def poisoned(self, packed, target, output):
        loss, parts = original(self, packed, target, output)
        if self.state.step in nan_steps:
            nan = torch.tensor(float("nan"), device=loss.device)
            return loss * nan, {k: v * nan for k, v in parts.items()}
        return loss, parts

    RetrofitTrainer._loss = poisoned
    try:
        run_retrofit(RetrofitConfig.from_dict(cfg), cfg, ["test"])
        error = None
    except NonFiniteTrainingError as exc:
        error = str(exc)
    finally:
        RetrofitTrainer._loss = original
    path = os.path.join(cfg["run_dir"], "metrics.jsonl")
    return {"error": error, "metrics": read_metrics(path) if os.path.isfile(path) else None}


def max_over_ranks_job(rank: int, world_size: int) -> float:
    from dms_megatron.training.loop import max_over_ranks

    return max_over_ranks(0.5 + 2.0 * rank)
