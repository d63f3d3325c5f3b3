"""Multi-rank runner for CPU/gloo Megatron tests: pooled rank processes, or fresh ones on request.

``run_distributed(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` on ``world_size`` ranks,
each with a new gloo process group on a free 127.0.0.1 port and the CPU shim installed, and returns every
rank's result in rank order. A rank's exception is re-raised here with the rank's traceback as its cause;
ranks still running after ``timeout`` seconds (or a few seconds after a peer failed) are killed. ``fn`` must
be a module-level function of an importable module and must not rely on state of the parent process. The
pytest process itself never initialises ``torch.distributed``. Ranks are ``spawn``-ed, never forked (a
forked child of a process that already ran gloo can deadlock).

Pooled (the default): a spawned interpreter pays ~7 s of imports (torch, megatron-core, wandb), so ranks
are started once and kept for the session (faster than per module, and as correct given the reset below).
``rank_pool`` holds one pool for every world size: slot i is rank i of each job, so 1-, 2- and 4-rank jobs
share at most four processes (~0.8 GB each). conftest stops it after the last test of tests/megatron and at
the end of the session; ``atexit`` is the fallback. Each job gets the parent's environment and cwd of the
moment, as a spawned child would; after it the rank is made to look fresh again (``rank_reset``: process
groups and megatron state destroyed; module globals, RNG seeds, signal handlers, environment, cwd, ...
restored). A rank whose reset finds something it cannot undo (a thread or child process still running) is
replaced with a warning, and all ranks of a job that failed, hung or timed out are killed and replaced.

Fresh (``fresh=True``, the ``@needs_fresh_process`` marker, or ``DMS_MEGATRON_FRESH_RANKS=1`` for every
job): one new process per rank per job, as before the pool. Used by jobs that change module state for
good and fail on purpose: ``convert_jobs.interrupted_import_job`` and ``interrupted_export_job`` replace
``dist_checkpointing.save`` / ``hf_io.write_shard`` without restoring them. Every other job runs pooled,
after reading its code: jobs that signal themselves (``train_ckpt_jobs.signal_job``, ``retrofit_job``
with ``preempt_after``) do so inside ``PreemptionGuard``, whose handlers are scoped (and the reset puts
every handler back); ``save_job`` and ``retrofit_job`` restore what they patch in ``finally``; the
checkpoint writer's helper process is shut down by the reset; no job uses ``os._exit`` or depends on
import-time state (the pooled rank imports what a fresh one does, with the same environment).
"""

from __future__ import annotations

import atexit
import os
import pickle
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

if __package__:
    from . import rank_worker
    from .rank_pool import GRACE_S, Outcome, RankPool, kill_group, scoped_environ
else:
    import rank_worker
    from rank_pool import GRACE_S, Outcome, RankPool, kill_group, scoped_environ

__all__ = [
    "RankFailedError",
    "find_free_port",
    "needs_fresh_process",
    "run_distributed",
    "shutdown_pool",
]

_POLL_S = 0.05
_FRESH_ENV = "DMS_MEGATRON_FRESH_RANKS"  # "1": every job in fresh processes (to compare with the pool)
_FRESH_MARK = "__needs_fresh_process__"
_ADDR = rank_worker.ADDR
_POOL: RankPool | None = None


class RankFailedError(RuntimeError):
    """A rank raised an exception whose type could not be re-created in the parent, or died without one."""

    def __init__(self, message: str, rank: int | None = None, traceback_text: str = "") -> None:
        super().__init__(message)
        self.rank = rank
        self.traceback_text = traceback_text


class _RemoteTracebackError(Exception):
    """Carries the traceback text of a rank; attached as ``__cause__`` of the re-raised exception."""

    def __str__(self) -> str:
        return str(self.args[0])


def needs_fresh_process[F: Callable[..., Any]](fn: F) -> F:
    """Mark a job function to run in new processes (it leaves module state changed, exits, ...)."""
    setattr(fn, _FRESH_MARK, True)
    return fn


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_ADDR, 0))
        return int(sock.getsockname()[1])


def _rank_env(port: int | None = None) -> dict[str, str]:
    env = {
        "OMP_NUM_THREADS": "1",  # 2 cores shared by all ranks
        "MKL_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",  # CPU harness even on a GPU host
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # silences megatron's sequence-parallel advice warning
        "MASTER_ADDR": _ADDR,
    }
    if port is not None:
        env["MASTER_PORT"] = str(port)
    return env


def _pool() -> RankPool:
    global _POOL
    if _POOL is None:
        _POOL = RankPool(_rank_env())
        atexit.register(shutdown_pool)  # after conftest's fixture; before multiprocessing joins children
    return _POOL


def shutdown_pool() -> None:
    """Stop every pooled rank (idempotent; conftest calls it at the end of the session)."""
    global _POOL
    pool, _POOL = _POOL, None
    if pool is not None:
        pool.shutdown()


def _run_pooled(fn: Callable[..., Any], world_size: int, args: tuple[Any, ...], timeout: float) -> Outcome:
    port = find_free_port()
    return _pool().run(fn, world_size, args, timeout, port, {**os.environ, **_rank_env(port)})


def _run_fresh(fn: Callable[..., Any], world_size: int, args: tuple[Any, ...], timeout: float) -> Outcome:
    ctx = mp.get_context("spawn")
    port = find_free_port()
    with tempfile.TemporaryDirectory(prefix="mcore_cpu_ranks_") as out_dir:
        procs = []
        try:
            with scoped_environ(_rank_env(port)):
                for rank in range(world_size):
                    proc = ctx.Process(
                        target=rank_worker.fresh_rank_main,
                        args=(fn, rank, world_size, port, out_dir, args, timeout),
                        name=f"mcore-cpu-rank{rank}",
                        daemon=False,  # non-daemon: ranks may start helpers
                    )
                    proc.start()
                    procs.append(proc)
            deadline = time.monotonic() + timeout
            failed_at: float | None = None
            while any(p.is_alive() for p in procs):
                now = time.monotonic()
                if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                    failed_at = now
                if now > deadline or (failed_at is not None and now > failed_at + GRACE_S):
                    break
                time.sleep(_POLL_S)
            hung = [r for r, p in enumerate(procs) if p.is_alive()]
        finally:
            for proc in procs:  # also reaps helpers left behind by ranks that exited normally
                kill_group(proc)
        paths = [Path(out_dir) / f"rank{r}.pkl" for r in range(world_size)]
        outcome = Outcome([_read(path) for path in paths], hung=hung)
        outcome.order = sorted((r for r in range(world_size) if paths[r].exists()), key=_mtime(paths))
        outcome.exitcodes = [proc.exitcode for proc in procs]
        return outcome


def _mtime(paths: list[Path]) -> Callable[[int], int]:
    return lambda rank: paths[rank].stat().st_mtime_ns


def _read(path: Path) -> tuple[Any, ...] | None:
    if not path.exists():
        return None
    with open(path, "rb") as f:
        return pickle.load(f)


def _raise_rank_error(rank: int, world_size: int, fn_name: str, payload: tuple[Any, ...]) -> None:
    _, text, blob, type_name = payload
    header = f"rank {rank} of {world_size} failed in {fn_name}; its traceback:\n{text}"
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
    if isinstance(exc, Exception):
        exc.add_note(f"(raised on rank {rank} of {world_size} in {fn_name})")
        raise exc from _RemoteTracebackError(header)
    raise RankFailedError(f"{type_name}: {header}", rank=rank, traceback_text=text)


def _results(fn_name: str, world_size: int, timeout: float, outcome: Outcome) -> list[Any]:
    """Every rank's result, or the first failure re-raised (the others usually fail in collectives after)."""
    payloads = outcome.payloads
    errors = [r for r in outcome.order if payloads[r] is not None and payloads[r][0] == "err"]  # type: ignore[index]
    if errors:
        _raise_rank_error(errors[0], world_size, fn_name, payloads[errors[0]])  # type: ignore[arg-type]
    if outcome.hung:
        raise TimeoutError(f"{fn_name}: ranks {outcome.hung} of {world_size} not done after {timeout:.0f} s")
    for rank, (code, payload) in enumerate(zip(outcome.exitcodes, payloads, strict=True)):
        if payload is None or code != 0:
            raise RankFailedError(
                f"{fn_name}: rank {rank} exited with code {code} without a result", rank=rank
            )
    return [payload[1] for payload in payloads if payload is not None]


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0, fresh: bool | None = None
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return each rank's result.

    ``fn`` and ``args`` must be picklable (``fn`` a module-level function); results must be picklable (move
    tensors to CPU). ``fresh``: new processes for this job (default: pooled ranks, unless ``fn`` is marked
    with ``needs_fresh_process`` or DMS_MEGATRON_FRESH_RANKS=1). See the module docstring.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    try:
        pickle.dumps((fn, args))
    except Exception as exc:
        raise TypeError(f"fn and args must be picklable for spawn (module-level function): {exc}") from exc
    if fresh is None:
        fresh = getattr(fn, _FRESH_MARK, False) or os.environ.get(_FRESH_ENV) == "1"
    run = _run_fresh if fresh else _run_pooled
    fn_name = f"{fn.__module__}.{fn.__qualname__}"
    try:
        return _results(fn_name, world_size, timeout, run(fn, world_size, args, timeout))
    except Exception as exc:
        text = f"{exc}\n{getattr(exc, '__cause__', '') or ''}"
        if "address already in use" not in text.lower() and "EADDRINUSE" not in text:
            raise
    # the free port was taken meanwhile (a failed pooled job has had its ranks replaced)
    return _results(fn_name, world_size, timeout, run(fn, world_size, args, timeout))
