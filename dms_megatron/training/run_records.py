"""What a run directory records about its runs, and who may write there.

- ``RunDirLock``: one run per run directory. Rank 0 holds an exclusive ``flock`` on ``RUN/.lock`` for
  the run's life; a second run on the same directory fails at once, naming the holder's pid and host.
- Config records: the first segment of a run writes ``config.yaml`` / ``run_info.json``; a segment
  resumed at step S writes ``config_resume_S.yaml`` / ``run_info_resume_S.json``, so the first record
  stays what trained the first steps.
- ``check_resume_config``: a resume compares the new config with the record of the segment that wrote
  the checkpoint. Identical: go. Only keys of ``SAFE_RESUME_CHANGES`` differ: a warning lists them.
  Anything else: ``ValueError`` listing each key with its old and new value, before any model exists.

No torch import: these checks run before process groups and models.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import platform
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
FIRST_CONFIG = "config.yaml"
FIRST_RUN_INFO = "run_info.json"
_RESUME_CONFIG = re.compile(r"^config_resume_(\d+)\.yaml$")

# key (or section prefix ending in ".") -> why changing it on resume is safe
SAFE_RESUME_CHANGES: dict[str, str] = {
    "train.steps": "the run stops elsewhere; the LR schedule restored from the checkpoint still decays "
    "over the first segment's steps",
    "train.save_interval": "checkpoint frequency only",
    "train.keep_last": "checkpoint retention only",
    "train.resume": "where to resume from",
    "logging.": "what is logged where",
    "run_dir": "where the run writes",
    "parallel.tp": "checkpoints are fully reshardable",
    "parallel.pp": "checkpoints are fully reshardable",
    "parallel.sequence_parallel": "layout only",
    "parallel.recompute": "memory / speed trade-off only",
    "parallel.micro_batch_size": "same global batch, split differently",
    "dms.attention_backend": "same attention, another kernel",
    "dms.kd_backend": "same distillation loss, another kernel",
}
# keys refused with a reason beyond "the run would change meaning"
_REFUSAL_NOTES: dict[str, str] = {
    "train.lr": "the LR schedule is restored from the checkpoint, so a new value would be ignored",
    "train.min_lr": "the LR schedule is restored from the checkpoint, so a new value would be ignored",
    "train.warmup_steps": "the LR schedule is restored from the checkpoint, so a new value would be ignored",
}


class RunDirInUseError(ValueError):
    """Another process holds the run directory's lock."""


class RunDirLock:
    """Exclusive lock on ``run_dir/.lock`` (``fcntl.flock``: released by the kernel when the process
    dies). Two open file descriptions conflict even within one process."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._file: Any = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = self.path.open("a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown process"
            f.close()
            raise RunDirInUseError(
                f"run_dir={self.path.parent} is in use by another run ({holder}): two runs on one run "
                "directory would interleave checkpoints and metrics. Wait for it to end, stop it, or "
                "choose another run_dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {platform.node()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path, rank: int) -> Any:
    """``RunDirLock`` on rank 0 only (the other ranks of the run share rank 0's directory)."""
    if rank != 0:
        yield None
        return
    with RunDirLock(run_dir) as lock:
        yield lock


def record_names(resume_step: int | None) -> tuple[str, str]:
    """(config file, run-info file) of a segment starting fresh (None) or resumed at a step."""
    if resume_step is None:
        return FIRST_CONFIG, FIRST_RUN_INFO
    return f"config_resume_{resume_step}.yaml", f"run_info_resume_{resume_step}.json"


def config_record_for_step(run_dir: str | Path, step: int) -> Path | None:
    """The config record of the segment that trained up to ``step``: the latest resume record started
    before ``step``, else ``config.yaml``; None when the run directory has neither."""
    run_dir = Path(run_dir)
    starts = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            m = _RESUME_CONFIG.match(p.name)
            if m and int(m.group(1)) < step:
                starts.append((int(m.group(1)), p))
    if starts:
        return max(starts)[1]
    first = run_dir / FIRST_CONFIG
    return first if first.is_file() else None


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value}."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _is_safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_RESUME_CHANGES)


def config_changes(
    old: dict[str, Any], new: dict[str, Any]
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """(safe, refused) changes between two nested configs: {key: (old, new)}; a key missing on one side
    has the value ``"<absent>"`` there."""
    flat_old, flat_new = flatten(old), flatten(new)
    safe, refused = {}, {}
    for key in sorted(set(flat_old) | set(flat_new)):
        a, b = flat_old.get(key, "<absent>"), flat_new.get(key, "<absent>")
        if a == b:
            continue
        (safe if _is_safe(key) else refused)[key] = (a, b)
    return safe, refused


def _normalised(config: dict[str, Any]) -> dict[str, Any]:
    """A recorded config with today's defaults filled in (as ``RetrofitConfig`` reads it); the raw
    record if it no longer validates."""
    from dataclasses import asdict

    from dms_megatron.config import RetrofitConfig

    try:
        return asdict(RetrofitConfig.from_dict(config))
    except (TypeError, ValueError) as exc:
        log.warning("the recorded config no longer validates (%s); comparing it as recorded", exc)
        return config


def check_resume_config(
    new: dict[str, Any], checkpoint: str | Path, step: int, checkpoint_dms: dict[str, Any] | None = None
) -> dict[str, tuple[Any, Any]]:
    """Compare the config of a resumed run (``asdict(RetrofitConfig)``) with the record of the run that
    saved ``checkpoint`` at ``step``; returns the safe changes (logged) or raises ``ValueError``.

    The record is looked up in the checkpoint's run directory (``checkpoints/iter_N`` -> its parent's
    parent); without one, the ``dms`` block the checkpoint carries (``checkpoint_dms``) is compared."""
    source_run = Path(checkpoint).resolve().parent.parent
    record = config_record_for_step(source_run, step)
    old: dict[str, Any] | None = None
    if record is not None:
        import yaml

        old = yaml.safe_load(record.read_text()) or None
    if old is not None:
        old, where = _normalised(old), str(record)
    elif checkpoint_dms is not None:
        old, new, where = {"dms": checkpoint_dms}, {"dms": new.get("dms", {})}, f"{checkpoint} (dms block)"
    else:
        log.warning("resuming from %s: no recorded config to compare the settings with", checkpoint)
        return {}
    safe, refused = config_changes(old, new)
    if refused:
        lines = [f"  {k}: {a!r} -> {b!r}" + _note(k) for k, (a, b) in refused.items()]
        raise ValueError(
            f"cannot resume from {checkpoint}: these settings differ from the run that saved it "
            f"({where}):\n" + "\n".join(lines) + "\nStart a new run with another run_dir "
            "for these settings, or put the old values back. Safe to change on "
            f"resume: {', '.join(k + ('*' if k.endswith('.') else '') for k in SAFE_RESUME_CHANGES)}"
        )
    if safe:
        log.warning(
            "resuming from %s with changed settings: %s",
            checkpoint,
            "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in safe.items()),
        )
    return safe


def _note(key: str) -> str:
    return f" ({_REFUSAL_NOTES[key]})" if key in _REFUSAL_NOTES else ""
