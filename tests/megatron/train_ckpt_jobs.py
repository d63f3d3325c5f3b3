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
    CheckpointSaveError,
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
            with contextlib.suppress(CheckpointSaveError):
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


def size_limited_save_job(rank: int, world: int, root: str, limit: int) -> str:
    """Save step 1, then step 2 under a file-size limit (``ulimit -f``) that the shard exceeds: the error
    a full disk gives, reproducibly. Returns the save error's message."""
    import resource

    model = _model(world)
    save_checkpoint(root, 1, model.sharded_state_dict(), {"consumed_samples": 8})
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        save_checkpoint(root, 2, model.sharded_state_dict(), {"consumed_samples": 16})
    except CheckpointSaveError as exc:
        return str(exc)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    return "saved"


KILL_PHASES = ("writing_shards", "recording_files", "marking_complete", "updating_latest")


class _Cut(BaseException):
    """An abrupt stop raised inside a save: like a kill, nothing of the save cleans up after it."""


def _cut_save_at(phase: str, rank: int, stop) -> None:
    """Patch ``save_checkpoint``'s steps so that ``stop()`` happens at ``phase`` (see ``KILL_PHASES``)."""
    from megatron.core import dist_checkpointing

    from dms_megatron.training import checkpoint as ckpt

    if phase == "writing_shards":

        def cut(state_dict, directory, *a, **k):
            (Path(directory) / f"__{rank}_0.distcp").write_bytes(b"partial")
            stop()

        dist_checkpointing.save = cut
    elif phase == "recording_files":

        def cut_record(folder, *a, **k):
            (Path(folder) / "checkpoint_files.json").write_text('{"files": {"a": ')
            stop()

        ckpt.record_files = cut_record
    elif phase == "marking_complete":
        real_rename = Path.rename

        def cut_rename(self, target):
            if self.name.endswith(".partial"):
                stop()
            return real_rename(self, target)

        Path.rename = cut_rename
    elif phase == "updating_latest":
        ckpt.os.replace = lambda *a, **k: stop()
    else:
        raise ValueError(phase)


def killed_save_job(
    rank: int, world: int, root: str, steps: list[int], phases: list[str], kill: bool
) -> None:
    """For each phase, in its own folder ``root/phase``: save ``steps``, the last save cut at that phase,
    inside the shard writes (one shard written), inside the file record (half written), after the
    checkpoint is marked complete but before its rename, or after the rename before ``latest`` moves.
    ``kill``: by a real SIGKILL of this process (one phase only), else by an exception nothing catches
    (the same files stay behind: no cleanup runs on either path)."""
    from megatron.core import dist_checkpointing

    from dms_megatron.training import checkpoint as ckpt

    def die() -> None:
        if kill:
            os.kill(os.getpid(), signal.SIGKILL)
        raise _Cut

    saved = (dist_checkpointing.save, ckpt.record_files, Path.rename, ckpt.os.replace)
    for phase in phases:
        folder = str(Path(root) / phase)
        model = _model(world)
        for step in steps[:-1]:
            _bump(model, step)
            save_checkpoint(folder, step, model.sharded_state_dict(), {"consumed_samples": 8 * step})
        _bump(model, steps[-1])
        _cut_save_at(phase, rank, die)
        try:
            save_checkpoint(
                folder, steps[-1], model.sharded_state_dict(), {"consumed_samples": 8 * steps[-1]}
            )
            raise AssertionError(f"the save was not cut at {phase}")
        except _Cut:
            pass
        finally:
            dist_checkpointing.save, ckpt.record_files, Path.rename, ckpt.os.replace = saved


def resume_after_cut_job(rank: int, world: int, root: str, phases: list[str]) -> dict:
    """``resume_job`` in each phase's folder, and the parameters of a model bumped for step 1 only."""
    expected = _model(world)
    _bump(expected, 1)
    return {
        "resumed": {phase: resume_job(rank, world, str(Path(root) / phase)) for phase in phases},
        "step1": {n: p.detach().clone() for n, p in expected.named_parameters()},
    }
