"""Building a retrofit run: process groups, student and teacher stages, Megatron DDP, the distributed
optimizer and the LR schedule. Everything here is collective (every rank calls it in the same order).

Precision: parameters in ``model.dtype`` (bf16 for real runs), gradients reduced in fp32, the
distributed optimizer keeps fp32 master weights and Adam state sharded over data-parallel ranks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dms_megatron.config import DMSConfig, RetrofitConfig
from dms_megatron.families import ModelArch
from dms_megatron.runtime import TORCH_DTYPES, free_port

log = logging.getLogger(__name__)
ADAPTER_KEY = "self_attention.adapter."


def init_distributed(tp: int, pp: int) -> int:
    """Start ``torch.distributed`` (torchrun's environment, or a 1-process group) and megatron's
    TP/PP/DP groups. Returns the data-parallel size. On a CPU-only machine turns on the CPU mode."""
    from megatron.core import parallel_state, tensor_parallel

    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain `python launch/retrofit.py`: one process
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        device = None
        if cuda:  # bound to its GPU: NCCL never has to guess a rank's device (a hang if it guesses wrong)
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30), device_id=device)
    if not cuda:
        from dms_megatron.megatron.patches.cpu_training import enable_cpu_training

        enable_cpu_training()
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(
            f"{world} processes cannot hold parallel.tp={tp} x parallel.pp={pp}: "
            f"the world size must be a multiple of {tp * pp}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    _warm_up_groups()
    return world // (tp * pp)


def _warm_up_groups() -> None:
    """One tiny all-reduce per process group: NCCL creates communicators lazily, and creating one late in a
    run (GPU memory full of activations and caches) was seen to fail with "Failed to CUDA calloc"."""
    from megatron.core import parallel_state as ps

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    for group in (
        ps.get_tensor_model_parallel_group(),
        ps.get_pipeline_model_parallel_group(),
        ps.get_data_parallel_group(),
        ps.get_model_parallel_group(),
        ps.get_embedding_group(check_initialized=False),
    ):
        if group is not None:
            dist.all_reduce(torch.zeros(1, device=device), group=group)


def teacher_dms_config(dms: DMSConfig) -> DMSConfig:
    """The separate teacher: adapter-variant modules with eviction off compute the original model
    exactly (and take packed documents like the student)."""
    return replace(dms, variant="adapter", teacher_mode=True, decisions_per="head")


@dataclass
class Models:
    student: torch.nn.Module  # this rank's stage, unwrapped
    teacher: torch.nn.Module | None  # None: the student with eviction off (adapter mode)
    ddp: torch.nn.Module  # the student wrapped in megatron's DDP
    arch: ModelArch


RECOMPUTE_SETTINGS: dict[str, dict[str, Any]] = {
    "none": {},
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}


def _build(
    arch: ModelArch,
    cfg: RetrofitConfig,
    dms: DMSConfig,
    dtype: torch.dtype,
    recompute: bool = False,
    spec: Any = None,
) -> torch.nn.Module:
    """One stage; ``recompute``: apply ``parallel.recompute`` (the student; the teacher keeps nothing);
    ``spec``: a layer spec instead of the family's (then ``dms`` is not applied)."""
    from dms_megatron.megatron.families import build_gpt_stage, layer_spec, transformer_config

    config = transformer_config(
        arch,
        cfg.parallel.tp,
        cfg.parallel.pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        sequence_parallel=cfg.parallel.sequence_parallel,
        use_cpu_initialization=not torch.cuda.is_available(),
        **(RECOMPUTE_SETTINGS[cfg.parallel.recompute] if recompute else {}),
    )
    model = build_gpt_stage(arch, config, layer_spec(arch, dms) if spec is None else spec)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def load_weights(model: torch.nn.Module, ckpt_dir: str, has_adapter: bool) -> None:
    """Load an imported (or exported-from-training) Megatron checkpoint into a stage at any layout;
    adapters absent from the checkpoint keep their zero initialisation."""
    from megatron.core import dist_checkpointing

    sharded = model.sharded_state_dict()
    if not has_adapter:
        sharded = {k: v for k, v in sharded.items() if ADAPTER_KEY not in k}
    state = dist_checkpointing.load(sharded, ckpt_dir)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if ADAPTER_KEY not in k and not k.endswith("_extra_state")]
    if bad or unexpected:
        raise ValueError(f"{ckpt_dir}: missing {bad[:5]}, unexpected {list(unexpected)[:5]}")


def build_models(cfg: RetrofitConfig, arch: ModelArch, checkpoint_meta: dict | None) -> Models:
    """Student (DMS) + teacher stages for this rank, weights loaded, student wrapped in DDP."""
    from dms_megatron.megatron import attach_dms_pipeline

    dtype = TORCH_DTYPES[cfg.model.dtype]
    student = _build(arch, cfg, cfg.dms, dtype, recompute=True)
    attach_dms_pipeline(student)
    teacher = None if cfg.train.mode == "adapter" else _build(arch, cfg, teacher_dms_config(cfg.dms), dtype)
    if cfg.model.checkpoint is not None:
        meta_dms = (checkpoint_meta or {}).get("dms")
        has_adapter = meta_dms is not None and meta_dms.get("variant") == "adapter"
        load_weights(student, cfg.model.checkpoint, has_adapter and cfg.dms.variant == "adapter")
        if teacher is not None:
            load_weights(teacher, cfg.model.checkpoint, False)
        log.info("loaded %s (teacher: %s)", cfg.model.checkpoint, "self" if teacher is None else "separate")
    elif teacher is not None:  # random debug model: the teacher is the initial student
        base = {k: v for k, v in student.state_dict().items() if ADAPTER_KEY not in k}
        teacher.load_state_dict(base, strict=False)
        log.warning("model.checkpoint is null: training from random initial weights (debug runs only)")
    if cfg.train.mode == "adapter":
        for name, p in student.named_parameters():
            p.requires_grad_(ADAPTER_KEY in name)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    log.info("trainable parameters on this rank: %d (mode=%s)", trainable, cfg.train.mode)
    return Models(student=student, teacher=teacher, ddp=wrap_ddp(student), arch=arch)


def wrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """Megatron DDP with fp32 gradient reduction, laid out for the distributed optimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True
    )
    return DistributedDataParallel(model.config, ddp_config, model)


def connect_schedule(ddp: torch.nn.Module, optimizer: Any) -> None:
    """Tell megatron's schedules how to defer, finish and scale gradient work for this DDP model."""
    from megatron.core.distributed import finalize_model_grads

    config = ddp.module.config
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = lambda _models, num_tokens=None, **kw: finalize_model_grads(
        [ddp], num_tokens, **kw
    )
    config.grad_scale_func = optimizer.scale_loss


def build_optimizer(cfg: RetrofitConfig, ddp: torch.nn.Module) -> tuple[Any, Any]:
    """Megatron's distributed Adam (fp32 master weights) and a warmup + cosine LR schedule; the DMS
    adapters' parameters get ``train.adapter_lr_mult`` times the rates when it is not 1."""
    from megatron.core.optimizer import (
        OptimizerConfig,
        ParamKey,
        get_megatron_optimizer,
        get_standard_config_overrides,
    )
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from dms_megatron.megatron.patches.grad_norm import use_foreach_grad_norm

    dtype = TORCH_DTYPES[cfg.model.dtype]
    t = cfg.train
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.95,
        clip_grad=t.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=True,
    )
    overrides = get_standard_config_overrides(opt_config)  # megatron's (no weight decay on biases/norms)
    if t.adapter_lr_mult != 1.0:  # the scheduler reads each group's max_lr / min_lr
        mult = t.adapter_lr_mult
        overrides[ParamKey(name=f"*{ADAPTER_KEY}*")] = {"max_lr": t.lr * mult, "min_lr": t.min_lr * mult}
    use_foreach_grad_norm()  # without TE / Apex: no host sync per gradient tensor in the norm
    optimizer = get_megatron_optimizer(opt_config, [ddp], config_overrides=overrides)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if t.warmup_steps else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=min(t.warmup_steps, t.steps - 1),  # a short debug run still decays
        lr_decay_steps=t.steps,
        lr_decay_style="cosine",
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
