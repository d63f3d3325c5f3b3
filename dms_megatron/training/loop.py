"""The step loop around ``RetrofitTrainer``: progress bar with ETA, metrics (console, JSONL, W&B),
checkpoints (interval, end, preemption) and the final CR plot."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dms_megatron.config import RetrofitConfig
from dms_megatron.training.metrics import (
    MetricsLogger,
    cr_metrics,
    plot_cr_curve,
    retrofit_flops_per_token,
    throughput,
)

log = logging.getLogger(__name__)


def _cr(result: Any, cfg: RetrofitConfig) -> dict[str, float]:
    r = result
    return cr_metrics(r.decision_cr, r.decision_target, r.target_cr, cfg.dms, cfg.data.seq_length)


def max_over_ranks(value: float) -> float:
    """The largest ``value`` over all ranks of the default group: a collective, every rank calls it
    (on the device of its backend: CUDA for NCCL, the CPU for gloo)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    on_cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _metrics(result: Any, cfg: RetrofitConfig, flops_per_token: float, world: int) -> dict[str, float]:
    tp = throughput(result.tokens, result.seconds, flops_per_token, world)
    m = {
        "loss/kd": result.kd,
        "loss/compression": result.compression,
        "loss/total": result.kd + cfg.dms.compression_weight * result.compression,
        **_cr(result, cfg),
        "lr": result.lr,
        "grad_norm": result.grad_norm,
        "step_time_s": result.seconds,
        "throughput/tokens_per_s": tp.tokens_per_s,
        "throughput/tflops_per_gpu": tp.tflops_per_gpu,
        "throughput/mfu": tp.mfu,
        **{f"train/{k}": v for k, v in result.extra.items()},
    }
    if torch.cuda.is_available():
        m["memory/max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return m


class _Progress:
    """A rich progress bar with ETA on the logging rank; nothing elsewhere."""

    def __init__(self, enabled: bool, start: int, total: int) -> None:
        self.bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("[bold]retrofit"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("steps", total=total, completed=start)
            self.bar.start()

    @property
    def console(self) -> Any:
        return self.bar.console if self.bar is not None else False

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def train_loop(
    trainer: Any,
    cfg: RetrofitConfig,
    start_step: int,
    guard: Any,
    logging_rank: bool,
    checkpoint_meta: Callable[[float | None], dict[str, Any]],
    config_dict: dict[str, Any],
    on_step: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    import torch.distributed as dist

    run_dir = Path(cfg.run_dir)
    ckpt_root = run_dir / "checkpoints"
    world = dist.get_world_size()
    flops = retrofit_flops_per_token(trainer.models.arch, cfg.data.seq_length)
    progress = _Progress(logging_rank and cfg.logging.console, start_step, cfg.train.steps)
    logger = None
    if logging_rank:
        logger = MetricsLogger(
            run_dir,
            cfg.logging.wandb_project,
            cfg.logging.run_name or run_dir.name,
            cfg.logging.group,
            config_dict,
            console=progress.console if cfg.logging.console else False,
            resume_step=start_step,
        )
    last = None
    step = start_step
    preempted = step < cfg.train.steps and guard.should_stop()  # signalled during setup
    if preempted:
        log.warning("preempted before the first step (at step %d): stopping, nothing new to save", step)
    try:
        while step < cfg.train.steps and not preempted:
            result = trainer.train_step(step)
            last = result
            step += 1
            log_now = step % cfg.logging.log_interval == 0 or step == cfg.train.steps
            peak = None  # every rank's peak: all ranks join the reduction, the logging rank reports it
            if log_now and torch.cuda.is_available():
                peak = max_over_ranks(torch.cuda.max_memory_allocated() / 2**30)
            if logger is not None and log_now:
                heat = step % cfg.logging.heatmap_interval == 0 or step == cfg.train.steps
                m = _metrics(result, cfg, flops, world)
                if peak is not None:
                    m["memory/max_allocated_gb_any_rank"] = peak
                logger.log(step, m, result.rates if heat else None)
            progress.advance()
            if on_step is not None:
                on_step(result)
            preempted = guard.should_stop()
            if preempted or step % cfg.train.save_interval == 0 or step == cfg.train.steps:
                trainer.save(
                    ckpt_root,
                    step,
                    {"consumed_samples": step * cfg.parallel.global_batch_size},
                    checkpoint_meta(_cr(result, cfg)["cr/memory"]),
                )
            if preempted:
                log.warning("preempted: checkpoint saved at step %d, stopping", step)
                break
    finally:
        progress.close()
        if logger is not None:
            logger.close()
    if logging_rank and (run_dir / "metrics.jsonl").is_file() and step > 0:
        try:
            plot_cr_curve(run_dir / "metrics.jsonl", run_dir / "cr_curve.png")
        except ValueError as exc:  # e.g. logging every N steps and fewer steps ran
            log.warning("no CR plot: %s", exc)
    return {
        "step": step,
        "preempted": preempted,
        "finished": step >= cfg.train.steps,
        "checkpoint": str(ckpt_root / f"iter_{step:07d}") if last is not None else None,
        "kd": None if last is None else last.kd,
        "compression": None if last is None else last.compression,
        **(
            {f"cr_{k.split('/')[1]}": v for k, v in _cr(last, cfg).items()}
            if last is not None
            else {f"cr_{k}": None for k in ("target", "memory", "memory_train_len", "decision_rate")}
        ),
        "cr_context": cfg.dms.cr_context or cfg.data.seq_length,
        "tokens_per_s": None if last is None else last.tokens / last.seconds,
    }
