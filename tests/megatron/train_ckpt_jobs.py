"""Rank-side jobs for training checkpoints (save / keep-last / interrupted save / resume / signals)."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import torch

from dms_megatron.megatron import apply_dms
from dms_megatron.megatron.families import local_layer_spec
from dms_megatron.testing import tiny_gpt
from dms_megatron.testing.tiny_dms import dms_test_config
from dms_megatron.training.checkpoint import (
    PreemptionGuard,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def _model(tp: int):
    spec = apply_dms(local_layer_spec(), dms_test_config())
    return tiny_gpt.build_tiny_gpt(tp, 1, seed=7, layer_spec=spec)


def _bump(model, step: int) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.001 * step)


def save_job(
    rank: int, world: int, root: str, steps: list[int], keep_last: int, crash_at: int | None
) -> dict:
    from megatron.core import dist_checkpointing

    model = _model(world)
    real_save = dist_checkpointing.save
    for step in steps:
        _bump(model, step)
        if step == crash_at:

            def dying(state_dict, directory, *a, **k):
                (Path(directory) / f"__{rank}_0.distcp").write_bytes(b"partial")
                raise RuntimeError("simulated crash during save")

            dist_checkpointing.save = dying
            with contextlib.suppress(RuntimeError):
                save_checkpoint(
                    root, step, model.sharded_state_dict(), {"consumed_samples": 8 * step}, keep_last
                )
            dist_checkpointing.save = real_save
            break
        save_checkpoint(root, step, model.sharded_state_dict(), {"consumed_samples": 8 * step}, keep_last)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def resume_job(rank: int, world: int, root: str) -> dict:
    model = _model(world)
    path = latest_checkpoint(root)
    state, train_state = load_checkpoint(path, model.sharded_state_dict())
    model.load_state_dict(state, strict=False)
    return {
        "path": str(path),
        "train_state": train_state,
        "steps": [s for s, _ in complete_checkpoints(root)],
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def signal_job(rank: int, world: int) -> list[bool]:
    seen = []
    with PreemptionGuard() as guard:
        seen.append(guard.should_stop())
        if rank == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        seen.append(guard.should_stop())
    return seen
