"""One retrofit run end to end: checks, run directory, build, resume, loop, checkpoints, metrics.

``run_retrofit(cfg)`` is what ``launch/retrofit.py`` calls on every rank (one process per GPU, or one
CPU process). Bad input fails in ``preflight`` before any process group, model or GPU memory exists.

Run directory::

    RUN/.lock              held by rank 0 while a run uses the directory (run_records.RunDirLock)
    RUN/config.yaml        the resolved configuration (what Hydra composed, after overrides)
    RUN/run_info.json      git SHA, package versions, command line, world size, start time
    RUN/config_resume_S.yaml, run_info_resume_S.json   the same for a segment resumed at step S
    RUN/metrics.jsonl      one record per logged step (the same names as on W&B)
    RUN/checkpoints/       iter_XXXXXXX/ (model + optimizer + train_state.json + dms_megatron.json)
    RUN/cr_curve.png       target vs achieved CR and the KD loss over steps (written at the end)
    RUN/summary.json       final step, CR, losses, wall time
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dms_megatron.config import RetrofitConfig
from dms_megatron.families import ModelArch, arch_from_hf_config
from dms_megatron.runtime import TORCH_DTYPES, package_versions

log = logging.getLogger(__name__)


@dataclass
class Preflight:
    arch: ModelArch
    meta: dict[str, Any] | None  # the imported checkpoint's dms_megatron.json
    eos_token_id: int | None
    resume_from: Path | None
    resume_step: int | None = None  # the step of ``resume_from``


def preflight(cfg: RetrofitConfig) -> Preflight:
    """Every check that needs no GPU: checkpoint, architecture, datasets, resume path."""
    from dms_megatron.training.checkpoint import latest_checkpoint
    from dms_megatron.training.data import check_dataset, check_dataset_tokenizer, config_eos_token_id

    arch = arch_from_hf_config(cfg.model.hf_config)
    meta = None
    if cfg.model.checkpoint is not None:
        from dms_megatron.convert.checkpoint import read_meta

        if not Path(cfg.model.checkpoint).is_dir():
            raise ValueError(
                f"model.checkpoint={cfg.model.checkpoint} does not exist: import the HF model first "
                "(python launch/convert.py import --hf <folder> --out <checkpoint>)"
            )
        meta = read_meta(cfg.model.checkpoint)
        ckpt_arch = ModelArch(**meta["arch"])
        diff = {
            k: (v, getattr(arch, k))
            for k, v in asdict(ckpt_arch).items()
            if not (
                v == getattr(arch, k)
                or (isinstance(v, float) and math.isclose(v, getattr(arch, k), rel_tol=1e-6))
            )
        }
        if diff:
            raise ValueError(
                f"model.checkpoint holds another architecture than model={cfg.model.name}: "
                f"(checkpoint, preset) differ in {diff}"
            )
    eos = config_eos_token_id(meta["hf_config"] if meta else cfg.model.hf_config)
    for prefix in cfg.data.prefixes:
        check_dataset(prefix, arch.vocab_size, eos)
    tokenizer_dir = cfg.model.hf_path
    if tokenizer_dir and any((Path(tokenizer_dir) / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        for prefix in cfg.data.prefixes:  # same vocabulary size and EOS is not the same tokenizer
            if not check_dataset_tokenizer(prefix, tokenizer_dir):
                log.info("dataset %s records no tokenizer identity (older preprocess): not compared", prefix)
    if not cfg.data.prefixes:
        raise ValueError("data.prefixes is empty: preprocess text with launch/preprocess.py and set it")
    if arch.max_position_embeddings < cfg.data.seq_length:
        raise ValueError(
            f"data.seq_length={cfg.data.seq_length} exceeds the model's context "
            f"({arch.max_position_embeddings} positions)"
        )
    resume = cfg.train.resume
    resume_from = None
    if resume == "auto":
        resume_from = latest_checkpoint(Path(cfg.run_dir) / "checkpoints")
    elif resume == "none":
        ckpts = Path(cfg.run_dir) / "checkpoints"
        if ckpts.is_dir() and any(ckpts.glob("iter_*")):
            raise ValueError(
                f"train.resume=none but {ckpts} holds checkpoints of an earlier run: a fresh run there would "
                "mix its checkpoints and records with them; choose another run_dir (or remove that folder)"
            )
    else:
        if not (Path(resume) / "train_state.json").is_file():
            raise ValueError(f"train.resume={resume} is not a complete training checkpoint")
        from dms_megatron.convert.file_records import check_files

        check_files(resume)  # sizes and hashes recorded at save: a damaged checkpoint fails here, in seconds
        resume_from = Path(resume)
    resume_step = None
    if resume_from is not None:
        from dms_megatron.training.run_records import check_resume_config

        resume_step = int(json.loads((resume_from / "train_state.json").read_text())["step"])
        ckpt_meta = resume_from / "dms_megatron.json"
        ckpt_dms = json.loads(ckpt_meta.read_text()).get("dms") if ckpt_meta.is_file() else None
        check_resume_config(asdict(cfg), resume_from, resume_step, ckpt_dms)
    return Preflight(arch, meta, eos, resume_from, resume_step)


def _git_sha() -> tuple[str | None, bool]:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
        return sha, dirty
    except (OSError, subprocess.CalledProcessError):
        return None, False


def versions() -> dict[str, str]:
    out = package_versions(
        ("megatron-core", "hydra-core", "omegaconf", "wandb", "transformers", "dms_megatron")
    )
    out["cuda"] = str(torch.version.cuda) if torch.cuda.is_available() else "none"
    return out


def write_run_info(
    run_dir: Path,
    config: dict[str, Any],
    argv: list[str],
    world_size: int,
    resume_step: int | None = None,
) -> None:
    """The resolved config and what produced it (rank 0 only). A resumed segment writes its own
    ``config_resume_<step>.yaml`` / ``run_info_resume_<step>.json`` when the run directory already has
    the first record, which stays as it was."""
    import yaml

    from dms_megatron.training.run_records import FIRST_CONFIG, record_names

    run_dir.mkdir(parents=True, exist_ok=True)
    config_name, info_name = record_names(resume_step if (run_dir / FIRST_CONFIG).is_file() else None)
    (run_dir / config_name).write_text(yaml.safe_dump(config, sort_keys=False))
    sha, dirty = _git_sha()
    info = {
        "git_sha": sha,
        "git_dirty": dirty,
        "command": [sys.executable, *argv],
        "cwd": os.getcwd(),
        "host": platform.node(),
        "world_size": world_size,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
    }
    (run_dir / info_name).write_text(json.dumps(info, indent=2) + "\n")


def _checkpoint_meta(cfg: RetrofitConfig, pre: Preflight, trained_cr: float | None) -> dict[str, Any]:
    source = dict((pre.meta or {}).get("source") or {})
    source.setdefault("hf_dir", cfg.model.hf_path)
    source["dtype"] = str(TORCH_DTYPES[cfg.model.dtype])
    return {
        "format": "dms_megatron/megatron-dist-checkpoint/v1",
        "arch": pre.arch.to_dict(),
        "hf_config": (pre.meta or {}).get("hf_config") or cfg.model.hf_config,
        "dms": asdict(cfg.dms),
        "source": source,
        "trained_cr": trained_cr,
        "versions": versions(),
    }


def describe_run(cfg: RetrofitConfig, world_size: int) -> str:
    """What a run is about to do, in a few lines: model, layout, recipe, memory-CR target, run dir."""
    d, t, p = cfg.dms, cfg.train, cfg.parallel
    dp = max(world_size // (p.tp * p.pp), 1)
    target = (
        f"memory CR {d.cr_start:g} -> {d.target_cr:g} at {d.cr_context} tokens"
        if d.cr_context
        else f"decision-rate CR {d.cr_start:g} -> {d.target_cr:g}"
    )
    fade = f", after a {d.fade_steps}-step channel fade" if d.fade_steps else ""
    teacher = "separate frozen teacher" if t.mode == "full" else "self-teacher, base frozen"
    return "\n".join(
        [
            f"retrofit {cfg.model.name} from {cfg.model.checkpoint or 'random weights'} ({cfg.model.dtype})",
            f"  layout: TP={p.tp} PP={p.pp} DP={dp}{' SP' if p.sequence_parallel else ''} on {world_size} "
            f"process(es); {t.steps} steps of {p.global_batch_size} x {cfg.data.seq_length} tokens",
            f"  recipe: {d.variant} variant, train.mode={t.mode} ({teacher}), window {d.window}, lr {t.lr:g}",
            f"  target: {target} over {d.cr_ramp_steps} steps{fade}",
            f"  run dir: {cfg.run_dir}",
        ]
    )


def run_retrofit(
    cfg: RetrofitConfig,
    config_dict: dict[str, Any] | None = None,
    argv: list[str] | None = None,
    on_step: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Train; returns the run summary (same on every rank). ``on_step`` is called after each step."""
    from dms_megatron.training.checkpoint import PreemptionGuard
    from dms_megatron.training.run_records import run_dir_lock

    t_start = time.perf_counter()
    # one run per run directory: rank 0 holds the lock until the run ends (before preflight, which reads
    # the directory's checkpoints and config records)
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    with run_dir_lock(cfg.run_dir, rank):
        pre = preflight(cfg)
        # The guard is entered before the slow part (process groups, dataset index, model build,
        # checkpoint load): Slurm's warning signal may come at any time, and without a handler it would
        # kill the task. A signal before the first step stops the run there (nothing new to save).
        with PreemptionGuard() as guard:
            return _run_guarded(cfg, pre, guard, t_start, config_dict, argv, on_step)


def _run_guarded(
    cfg: RetrofitConfig,
    pre: Preflight,
    guard: Any,
    t_start: float,
    config_dict: dict[str, Any] | None,
    argv: list[str] | None,
    on_step: Callable[[Any], None] | None,
) -> dict[str, Any]:
    from megatron.core import parallel_state

    from dms_megatron.training.batches import build_gpt_dataset
    from dms_megatron.training.loop import train_loop
    from dms_megatron.training.setup import build_models, build_optimizer, init_distributed
    from dms_megatron.training.trainer import RetrofitTrainer

    dp = init_distributed(cfg.parallel.tp, cfg.parallel.pp)
    run_dir = Path(cfg.run_dir)
    if dist.get_rank() == 0:
        write_run_info(
            run_dir, config_dict or asdict(cfg), argv or sys.argv, dist.get_world_size(), pre.resume_step
        )
        if cfg.logging.console:
            print(describe_run(cfg, dist.get_world_size()), flush=True)
    dist.barrier()
    num_samples = cfg.train.steps * cfg.parallel.global_batch_size
    dataset = build_gpt_dataset(
        cfg.data.prefixes,
        cfg.data.weights,
        cfg.data.seq_length,
        num_samples,
        cfg.train.seed,
        pre.arch.vocab_size,
        pre.eos_token_id if pre.eos_token_id is not None else 0,
        run_dir / "data_cache",
    )
    models = build_models(cfg, pre.arch, pre.meta)
    optimizer, scheduler = build_optimizer(cfg, models.ddp)
    trainer = RetrofitTrainer(cfg, models, optimizer, scheduler, dataset, dp, pre.eos_token_id)
    start_step = 0
    if pre.resume_from is not None:
        train_state = trainer.load(pre.resume_from)
        start_step = int(train_state["step"])
        if dist.get_rank() == 0:
            log.info("resumed from %s at step %d", pre.resume_from, start_step)
    logging_rank = (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )
    summary = train_loop(
        trainer,
        cfg,
        start_step,
        guard,
        logging_rank,
        lambda cr: _checkpoint_meta(cfg, pre, cr),
        config_dict or {},
        on_step,
    )
    summary["wall_s"] = time.perf_counter() - t_start
    summary["resumed_from_step"] = start_step
    if logging_rank:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    dist.barrier()
    return summary
