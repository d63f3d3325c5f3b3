"""Training checkpoints: atomic, keep-last-K, auto-resume, preemption-safe.

Layout (Megatron-LM style, so its tools recognise it)::

    RUN/checkpoints/iter_0000100/            megatron dist_checkpointing + checkpoint_files.json
                                             + train_state.json
    RUN/checkpoints/latest_checkpointed_iteration.txt

A save writes ``.iter_XXXXXXX.partial`` and renames it into place only after every rank finished and
``train_state.json`` is written; the ``latest`` file is replaced atomically afterwards. A save that is
interrupted therefore never shadows the last good checkpoint, and ``latest_checkpoint`` ignores
incomplete folders even if ``latest`` points at one. ``checkpoint_files.json`` records each file's size
(and the sha256 of the small ones) at save; a checkpoint whose files differ is skipped on resume and
refused on load (``convert.file_records``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from dms_megatron.convert.file_records import CorruptCheckpointError, check_files, file_problems, record_files

log = logging.getLogger(__name__)
LATEST = "latest_checkpointed_iteration.txt"
TRAIN_STATE = "train_state.json"
_ITER = re.compile(r"^iter_(\d{7})$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def iteration_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _ITER.match(p.name)
        if m and (p / TRAIN_STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint to resume from: the one ``latest`` names if complete and intact, else the newest
    complete, intact one. A checkpoint whose files differ from the record written at its save (truncated,
    missing or modified) is skipped with a warning; if every complete checkpoint is damaged, the run
    stops with the list (starting over silently would discard the run)."""
    root = Path(root)
    latest = root / LATEST
    candidates = [path for _step, path in reversed(complete_checkpoints(root))]
    if latest.is_file():
        try:
            named = iteration_dir(root, int(latest.read_text().strip()))
            if (named / TRAIN_STATE).is_file():
                candidates.remove(named)
                candidates.insert(0, named)
            else:
                log.warning("%s names %s, which is incomplete; falling back", latest, named)
        except ValueError:
            log.warning("%s is unreadable; falling back", latest)
    damaged = []
    for path in candidates:
        problems = file_problems(path)
        if not problems:
            return path
        damaged.append(f"{path}: " + "; ".join(problems))
        log.warning("checkpoint %s is damaged, trying an older one: %s", path, "; ".join(problems))
    if damaged:
        listed = "\n  ".join(damaged)
        raise CorruptCheckpointError(
            f"every complete checkpoint under {root} is damaged:\n  {listed}\n"
            "restore one, point train.resume at an intact checkpoint, or start a new run_dir"
        )
    return None


def save_checkpoint(
    root: str | Path,
    step: int,
    sharded_state_dict: dict[str, Any],
    train_state: dict[str, Any],
    keep_last: int | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Collective: every rank calls it with its own sharded state dict (model, optimizer, ...).
    ``meta``: written as ``dms_megatron.json`` so the checkpoint exports like an imported one."""
    from megatron.core import dist_checkpointing

    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    root = Path(root)
    final = iteration_dir(root, step)
    staging = root / f".{final.name}.partial"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
    _barrier()
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        dist_checkpointing.save(sharded_state_dict, str(staging))
    except (Exception, CheckpointException) as exc:
        raise _save_error(exc, staging, root) from exc
    _barrier()
    if _rank() == 0:
        if meta is not None:
            (staging / "dms_megatron.json").write_text(json.dumps(meta, indent=2) + "\n")
        record_files(staging)  # before TRAIN_STATE, the mark of a complete checkpoint
        (staging / TRAIN_STATE).write_text(json.dumps({"step": step, **train_state}, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(f"{step}\n")
        os.replace(tmp, root / LATEST)
        if keep_last is not None:
            for _old_step, path in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(path)
                log.info("removed old checkpoint %s (keep_last=%d)", path, keep_last)
        log.info("saved checkpoint %s", final)
    _barrier()
    return final


def load_checkpoint(
    path: str | Path, sharded_state_dict: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective load of a checkpoint saved at any TP/PP; returns (state dict, train_state)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not (path / TRAIN_STATE).is_file():
        raise ValueError(f"{path} is not a complete training checkpoint (no {TRAIN_STATE})")
    check_files(path)  # before torch unpickles anything in it
    state = dist_checkpointing.load(sharded_state_dict, str(path))
    return state, json.loads((path / TRAIN_STATE).read_text())


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (disk full, file-size limit, I/O error); the previous one is intact."""


def _save_error(exc: BaseException, staging: Path, root: Path) -> CheckpointSaveError:
    """One clear error for a failed save: which folder, the likely cause, what is kept. The staging folder
    stays (other ranks may still be writing into it); the next save replaces it, or remove it by hand."""
    import errno
    import resource

    chain, seen = [], exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " | ".join(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}" for e in chain)
    codes = {getattr(e, "errno", None) for e in chain}
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = None
    # megatron's writer processes report only "Worker failure ... <class 'OSError'>": judge by the state too
    fsize = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if errno.ENOSPC in codes or "No space left" in text or (free is not None and free < 256 << 20):
        cause = "the disk is full"
    elif errno.EFBIG in codes or "File too large" in text or fsize != resource.RLIM_INFINITY:
        limit = "" if fsize == resource.RLIM_INFINITY else f" ({fsize} bytes)"
        cause = f"a file exceeded the file-size limit (ulimit -f{limit}, or the filesystem's maximum)"
    elif errno.EDQUOT in codes or "quota" in text.lower():
        cause = "the disk quota is exceeded"
    else:
        cause = "a write failed (disk full, quota or I/O error; the writer's own message is above)"
    where = "" if free is None else f"; {free / 2**30:.1f} GiB free on {root}"
    done = complete_checkpoints(root)
    kept_text = f"the last complete checkpoint {done[-1][1]} is kept" if done else "no earlier checkpoint"
    return CheckpointSaveError(
        f"saving checkpoint {staging.name.removeprefix('.').removesuffix('.partial')} under {root} failed: "
        f"{cause}{where}; {kept_text}; the partial {staging} can be removed. Cause: {text[:500]}"
    )


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_SIGNALS = (*PREEMPTION_SIGNALS, signal.SIGINT)  # Ctrl-C: like a preemption, once


@contextlib.contextmanager
def signals_blocked(signals: Iterable[int] = STOP_SIGNALS) -> Iterator[None]:
    """Block ``signals`` in the calling thread; processes started meanwhile inherit the blocked mask (through
    fork and exec), so a signal sent to the whole process group or job does not kill them. A signal that
    arrives meanwhile stays pending and is handled when the mask is restored."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start_save_helpers() -> None:
    """Start the helper process of megatron's checkpoint saves now, immune to the preemption signals.

    ``dist_checkpointing.save`` hands each save's write results through a ``multiprocessing`` Manager, a
    process spawned at the first save and kept for the run. It shares our process group (and Slurm job),
    so the SIGTERM that GNU ``timeout``, Slurm or ``kill -- -PGID`` send to every process killed it along
    with the training process, whose preemption save then failed with ``BrokenPipeError``."""
    from multiprocessing import resource_tracker

    try:
        from megatron.core.dist_checkpointing.strategies.filesystem_async import get_write_results_queue
    except ImportError:  # another megatron-core layout: nothing to start early
        return
    # spawning needs the resource tracker; starting it unblocks SIGINT and SIGTERM again (CPython's
    # resource_tracker.ensure_running), so it must be running before the Manager is spawned
    with signals_blocked():
        resource_tracker.ensure_running()
    with signals_blocked():
        get_write_results_queue()


class PreemptionGuard:
    """Turns SIGTERM / SIGUSR1 (Slurm's preemption and time-limit warnings) and a first SIGINT (Ctrl-C)
    into a flag that the loop checks at step boundaries; ``should_stop()`` agrees across ranks (any rank
    signalled -> all stop). A second SIGINT ends the process at once, without a checkpoint (the last
    complete one stays valid: saves are atomic).

    Entering it also starts the checkpoint saves' helper process with these signals blocked
    (``start_save_helpers``), so that the save after a group-wide signal still works. A helper started
    earlier (a save before the guard) is not protected."""

    SIGNALS = STOP_SIGNALS

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionGuard:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        start_save_helpers()
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        if signum == signal.SIGINT:
            # a second Ctrl-C gets the default action: the process dies at once, also inside a blocking
            # collective or a save (whose staging folder never shadows the last complete checkpoint)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        log.warning(
            "received %s: saving a checkpoint and stopping at the end of this step%s",
            signal.Signals(signum).name,
            " (Ctrl-C again: exit now, without a checkpoint)" if signum == signal.SIGINT else "",
        )

    def should_stop(self) -> bool:
        device = "cpu"
        if dist.is_initialized() and dist.get_backend() == "nccl":
            device = f"cuda:{torch.cuda.current_device()}"
        flag = torch.tensor([1 if self.received is not None else 0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
