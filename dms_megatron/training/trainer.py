"""The retrofit loop: one optimizer step = megatron's pipeline schedule over this rank's micro-batches
with the teacher inside the same schedule (``DistillationStage``), loss = KL + lambda * compression.

Per step: set the DMS state (step, target), run ``forward_backward``, ``optimizer.step()`` (DP grad
reduce-scatter, clipping, fp32 master update), advance the LR schedule, reduce the per-[layer, head]
eviction rates once, log, and checkpoint every ``train.save_interval`` steps, at the end and when a
preemption signal arrived (every rank agrees before saving).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dms_megatron.config import RetrofitConfig
from dms_megatron.core.losses import kd_token_mask
from dms_megatron.training.batches import StepSlice, pack_thd, step_micro_batches
from dms_megatron.training.setup import Models, connect_schedule

# named step regions for torch.profiler (near-free when no profiler runs); their names and how they are
# summarised: training/step_profile.py (the teacher / student forward regions are opened by
# megatron.distill.DistillationStage)
_region = torch.profiler.record_function

log = logging.getLogger(__name__)


def all_finite(x: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor on ``x``'s device: no NaN or +-Inf in ``x``. One read of ``x``: its fp32 sum is
    non-finite when an element is (or when finite values sum past ~3.4e38, which only a diverged run's
    gradients do); ``isfinite(x).all()`` also writes and re-reads a bool copy of ``x`` (the step's
    non-finite check took 3.3 ms of kernels at one TP=8 rank of the 4-layer 32B benchmark on an H100)."""
    return torch.isfinite(x.sum(dtype=torch.float32))


@dataclass
class StepResult:
    step: int
    kd: float
    compression: float
    target_cr: float  # the schedule's CR (a memory CR at dms.cr_context tokens unless that is 0)
    rates: torch.Tensor  # [layers, kv_heads] eviction rate of this step
    lr: float
    grad_norm: float
    seconds: float
    tokens: int
    extra: dict[str, float] = field(default_factory=dict)
    decision_target: float = 1.0  # the decision-rate CR the compression loss asked for

    @property
    def decision_cr(self) -> float:
        """1 / (1 - evicted fraction) of this step's decisions (the decision rate)."""
        evicted = float(self.rates.mean())
        return 1.0 / max(1.0 - evicted, 1e-6)


class NonFiniteTrainingError(RuntimeError):
    """NaN/Inf in the loss or gradients with ``train.on_nonfinite=stop`` (or too many skips in a row)."""


class RetrofitTrainer:
    """Owns the models, optimizer, schedule and data of one run; ``train_step(step)`` is the unit."""

    def __init__(
        self,
        cfg: RetrofitConfig,
        models: Models,
        optimizer: Any,
        scheduler: Any,
        dataset: Any,
        dp_size: int,
        eos_token_id: int | None,
    ) -> None:
        from megatron.core import parallel_state

        from dms_megatron.megatron.distill import DistillationStage
        from dms_megatron.megatron.pipeline import dms_run_state

        self.cfg, self.models, self.optimizer, self.scheduler = cfg, models, optimizer, scheduler
        self.dataset, self.eos = dataset, eos_token_id
        self.stage = DistillationStage(models.ddp, models.teacher, teacher_graph=cfg.train.teacher_cuda_graph)
        self.state = dms_run_state(models.student)
        self.slicer = StepSlice(
            cfg.parallel.global_batch_size,
            cfg.parallel.micro_batch_size,
            parallel_state.get_data_parallel_rank(),
            dp_size,
        )
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        self.is_last_stage = parallel_state.is_pipeline_last_stage()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        connect_schedule(models.ddp, optimizer)
        self.num_layers = models.arch.num_layers
        self.num_kv_heads = models.arch.num_query_groups
        self.nonfinite_streak = 0  # consecutive steps skipped for NaN/Inf

    # ------------------------------------------------------------------------------------------- step
    def _loss(self, packed: dict[str, Any], target: float, output: torch.Tensor):
        from dms_megatron.megatron import dms_compression_loss
        from dms_megatron.megatron.kd import vocab_parallel_kd_loss

        dms = self.cfg.dms
        with _region("dms.kd_loss"):
            mask = kd_token_mask(packed["input_ids"], self.eos)
            kd = vocab_parallel_kd_loss(
                output,
                self.stage.teacher_logits,
                mask,
                direction=dms.kl_direction,
                temperature=dms.kl_temperature,
                backend=dms.kd_backend,
            )
        self.stage.teacher_logits = None  # never kept beyond its micro-batch
        with _region("dms.compression_loss"):
            cmp = dms_compression_loss(
                self.stage.student,
                packed["valid"],
                target,
                self.num_layers,
                self.num_kv_heads,
                samples=packed["samples"],
            )
        loss = kd + dms.compression_weight * cmp
        return loss, {"kd": kd.detach().clone(), "cmp": cmp.detach().clone()}

    def train_step(self, step: int) -> StepResult:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from dms_megatron.megatron.distill import adjust_distill_p2p_shapes
        from dms_megatron.megatron.pipeline import reduce_decision_stats

        t0 = time.perf_counter()
        schedule = self.cfg.dms.schedule
        target = schedule.target_fraction(step)
        self.state.step, self.state.target_fraction = step, target
        self._fade(step)
        with _region("dms.read_and_pack"):
            micro = step_micro_batches(self.dataset, self.slicer, step)
            device = self.device if self.device is not None else "cpu"
            packed = [pack_thd(mb, device) for mb in micro]
        b, s = micro[0]["tokens"].shape

        def forward_step(data_iterator, model):
            i, p = next(data_iterator)
            self.state.micro_batch = i
            out = model(
                input_ids=p["input_ids"],
                position_ids=p["position_ids"],
                attention_mask=None,
                packed_seq_params=p["packed_seq_params"],
            )
            return out, partial(self._loss, p, target)

        self.models.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.stage.train()
        extra = {"adjust_tensor_shapes_fn": adjust_distill_p2p_shapes} if self.pp > 1 else {}
        with _region("dms.forward_backward"):
            out = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(enumerate(packed)),
                model=[self.stage],
                num_microbatches=len(packed),
                seq_length=b * s,
                micro_batch_size=1,
                forward_only=False,
                **extra,
            )
        with _region("dms.nonfinite_check"):
            finite = self._finite_step(step, out)
        with _region("dms.optimizer_step"):
            if finite:
                ok, grad_norm, _ = self.optimizer.step()
            else:
                ok, grad_norm = False, math.nan
            if ok:
                self.scheduler.step(increment=1)
        with _region("dms.step_stats"):
            rates = reduce_decision_stats(self.state, self.num_layers, self.num_kv_heads, device=self.device)
            kd, cmp = self._mean_losses(out)
        if self.device is not None:
            torch.cuda.synchronize()
        return StepResult(
            step=step,
            kd=kd,
            compression=cmp,
            target_cr=schedule.cr(step),
            decision_target=schedule.decision_cr(step),
            rates=rates.cpu(),
            lr=float(self.optimizer.param_groups[0]["lr"]),
            grad_norm=float(grad_norm) if grad_norm is not None else math.nan,
            seconds=time.perf_counter() - t0,
            tokens=self.cfg.parallel.global_batch_size * s,
            extra={"skipped": 0.0 if ok else 1.0},
        )

    def _fade(self, step: int) -> None:
        """Neuron variant: fade the repurposed channel out over ``dms.neuron_fade_steps`` steps, then
        zero its q rows (model and optimizer main params) at the step the fade ends."""
        fade = self.cfg.dms.fade_steps
        self.state.channel_keep = max(0.0, 1.0 - step / fade) if fade else 0.0
        if fade and step == fade:
            from dms_megatron.megatron import zero_repurposed_q_rows

            rows = zero_repurposed_q_rows(self.models.student)
            self.optimizer.reload_model_params()
            log.info("step %d: channel fade done, zeroed %d repurposed q rows; eviction starts", step, rows)

    def _finite_step(self, step: int, out: list[dict[str, torch.Tensor]] | None) -> bool:
        """Whether every rank's losses and gradients are finite; otherwise log the step and this rank's
        non-finite micro-batches, and skip the update or raise ``NonFiniteTrainingError``
        (``train.on_nonfinite``, ``train.max_nonfinite_skips``)."""
        losses = (out or []) if self.is_last_stage else []
        finite = (
            torch.isfinite(torch.stack([torch.stack([d["kd"], d["cmp"]]) for d in losses])).all(1)
            if losses
            else torch.ones(0, dtype=torch.bool)
        )
        ddp = self.models.ddp
        grads = [
            b.grad_data for b in [*getattr(ddp, "buffers", []), *getattr(ddp, "expert_parallel_buffers", [])]
        ]
        grads_finite = [all_finite(g) for g in grads]
        flag = torch.zeros(1, device=self.device)  # stays on the device: one host sync, at .item()
        if len(finite):
            flag += (~finite.all()).float().to(flag.device)
        if grads_finite:
            flag += (~torch.stack(grads_finite).all()).float().to(flag.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            self.nonfinite_streak = 0
            return True
        bad = (~finite).nonzero().flatten().tolist()
        grads_ok = bool(torch.stack(grads_finite).all()) if grads_finite else True
        self.nonfinite_streak += 1
        here = []
        if bad:
            here.append(f"loss of micro-batch(es) {bad}")
        if not grads_ok:
            here.append("gradients")
        seen = f"rank {dist.get_rank()}: {' and '.join(here)}" if here else "on another rank"
        what = f"step {step + 1}: NaN/Inf in the loss or gradients ({seen})"  # 1-based, as metrics
        t = self.cfg.train
        if t.on_nonfinite == "stop" or self.nonfinite_streak > t.max_nonfinite_skips:
            why = (
                "train.on_nonfinite=stop"
                if t.on_nonfinite == "stop"
                else f"{self.nonfinite_streak} in a row, train.max_nonfinite_skips={t.max_nonfinite_skips}"
            )
            raise NonFiniteTrainingError(
                f"{what}: stopping ({why}); the last checkpoint is the last good state"
            )
        log.warning("%s: update skipped (train.on_nonfinite=skip)", what)
        return False

    def _mean_losses(self, out: list[dict[str, torch.Tensor]] | None) -> tuple[float, float]:
        """Micro-batch mean on the last stage, averaged over DP; broadcast from the last stage so every
        rank returns the same numbers."""
        from megatron.core import parallel_state

        vals = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.is_last_stage and out:  # one device-side mean, no host sync per micro-batch
            vals = (
                torch.stack([torch.stack([d["kd"], d["cmp"]]) for d in out]).double().mean(0).to(vals.device)
            )
        dist.all_reduce(vals, group=parallel_state.get_data_parallel_group())
        vals /= parallel_state.get_data_parallel_world_size()
        if self.pp > 1:  # the last stage holds the losses; others contributed zeros
            dist.all_reduce(vals, group=parallel_state.get_pipeline_model_parallel_group())
        return float(vals[0]), float(vals[1])

    # ------------------------------------------------------------------------------------ checkpoints
    def sharded_state_dict(self, is_loading: bool = False) -> dict[str, Any]:
        """Model + optimizer (fully reshardable, so a checkpoint loads at any TP/PP)."""
        model_sd = self.models.student.sharded_state_dict()
        return {
            **model_sd,
            "optimizer": self.optimizer.sharded_state_dict(
                model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"}
            ),
        }

    def load(self, path: str | Path) -> dict[str, Any]:
        """Restore model, optimizer and LR schedule from a training checkpoint (any TP/PP)."""
        from dms_megatron.megatron.patches.adam_step import keep_torch_adam_step_on_load
        from dms_megatron.training.checkpoint import load_checkpoint

        # a fresh torch Adam has no state to load into (megatron-core 0.19.2 asserts on the missing "step"
        # without Apex/TE); megatron's own loader first creates it with a zero-gradient step
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = getattr(opt, "optimizer", None)
            dummy = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
            if inner is not None and not inner.state and dummy is not None:
                dummy()
        keep_torch_adam_step_on_load()
        state, train_state = load_checkpoint(path, self.sharded_state_dict(is_loading=True))
        opt_state = state.pop("optimizer")
        self.models.student.load_state_dict(state, strict=False)
        self.optimizer.load_state_dict(opt_state)
        self.scheduler.load_state_dict(train_state["scheduler"])
        return train_state

    def save(self, root: str | Path, step: int, extra: dict[str, Any], meta: dict[str, Any]) -> Path:
        from dms_megatron.training.checkpoint import save_checkpoint

        train_state = {"scheduler": self.scheduler.state_dict(), **extra}
        return save_checkpoint(
            root, step, self.sharded_state_dict(), train_state, self.cfg.train.keep_last, meta=meta
        )
