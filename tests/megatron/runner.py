"""Spawn-based multi-rank runner for CPU/gloo Megatron tests.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` fresh interpreters with the ``spawn`` start
method (never ``fork``: a forked child of a process that already ran gloo can deadlock), initialises a gloo
process group on a free 127.0.0.1 port in each, installs the CPU shim, calls ``fn(rank, world_size, *args)``
and returns every rank's result. ``fn`` must be a module-level function of an importable module, and must not
rely on state of the parent process. The pytest process itself never initialises ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

__all__ = ["RankFailedError", "find_free_port", "run_distributed"]

_POLL_S = 0.05
_GRACE_S = 5.0  # after one rank fails, how long the others get to finish (or fail) on their own
_ADDR = "127.0.0.1"


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


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_ADDR, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _environ(updates: dict[str, str]) -> Iterator[None]:
    """Temporarily set environment variables (spawned children copy os.environ when they start)."""
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _write_result(path: Path, payload: tuple[Any, ...]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def _flush_and_exit(code: int) -> None:
    """Exit a rank without interpreter teardown (seconds with megatron loaded; peers may hang in gloo)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    args: tuple[Any, ...],
    timeout: float,
) -> None:
    """Entry point of one spawned rank (module level, so spawn can import it; no work at import time)."""
    os.setpgrp()  # own process group: the parent can kill this rank together with any helper it started
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})
    result_path = Path(out_dir) / f"rank{rank}.pkl"
    warnings.filterwarnings("ignore", message=".*is not installed.*", category=UserWarning)  # TE/Apex/absl
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if __package__:
            from .cpu_shim import install_cpu_shim
        else:
            from cpu_shim import install_cpu_shim
        install_cpu_shim()
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{_ADDR}:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        result = fn(rank, world_size, *args)
    except BaseException as exc:
        text = traceback.format_exc()
        try:
            blob = pickle.dumps(exc)
        except Exception:
            blob = None
        _write_result(result_path, ("err", text, blob, f"{type(exc).__module__}.{type(exc).__qualname__}"))
        _flush_and_exit(1)  # peers may be stuck in a collective; skip teardown, the parent cleans up
    try:
        _write_result(result_path, ("ok", result))
    except Exception:
        text = "result of rank could not be pickled:\n" + traceback.format_exc()
        _write_result(result_path, ("err", text, None, "pickle.PicklingError"))
        _flush_and_exit(1)
    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    except Exception:
        pass
    if dist.is_initialized():
        dist.destroy_process_group()
    _flush_and_exit(0)


def _kill_group(proc: Any) -> None:
    """SIGKILL a rank's process group (the rank and any helper it started, e.g. a multiprocessing manager)."""
    if proc.pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the rank called os.setpgrp(), so its pgid is its pid
    if proc.is_alive():
        proc.kill()  # the rank had not reached setpgrp() yet
    proc.join(5.0)


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


def _run_once(
    fn: Callable[..., Any], world_size: int, args: tuple[Any, ...], timeout: float, port: int
) -> list[Any]:
    ctx = mp.get_context("spawn")
    fn_name = f"{fn.__module__}.{fn.__qualname__}"
    with tempfile.TemporaryDirectory(prefix="mcore_cpu_ranks_") as out_dir:
        env = {
            "OMP_NUM_THREADS": "1",  # 2 cores shared by all ranks
            "MKL_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",  # CPU harness even on a GPU host
            "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # silences megatron's sequence-parallel advice warning
            "MASTER_ADDR": _ADDR,
            "MASTER_PORT": str(port),
        }
        procs = []
        try:
            with _environ(env):
                for rank in range(world_size):
                    proc = ctx.Process(
                        target=_rank_main,
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
                if now > deadline or (failed_at is not None and now > failed_at + _GRACE_S):
                    break
                time.sleep(_POLL_S)
            hung = [r for r, p in enumerate(procs) if p.is_alive()]
        finally:
            for proc in procs:  # also reaps helpers left behind by ranks that exited normally
                _kill_group(proc)

        paths = [Path(out_dir) / f"rank{r}.pkl" for r in range(world_size)]
        payloads = [_read(path) for path in paths]
        errors = [r for r, payload in enumerate(payloads) if payload is not None and payload[0] == "err"]
        if errors:  # the first rank to fail is usually the cause; the others fail in collectives after it
            first = min(errors, key=lambda r: paths[r].stat().st_mtime_ns)
            _raise_rank_error(first, world_size, fn_name, payloads[first])
        if hung:
            raise TimeoutError(f"{fn_name}: ranks {hung} of {world_size} not done after {timeout:.0f} s")
        for rank, (proc, payload) in enumerate(zip(procs, payloads, strict=True)):
            if payload is None or proc.exitcode != 0:
                raise RankFailedError(
                    f"{fn_name}: rank {rank} exited with code {proc.exitcode} without a result", rank=rank
                )
        return [payload[1] for payload in payloads if payload is not None]


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; return each rank's result.

    ``fn`` and ``args`` must be picklable (``fn`` a module-level function); results must be picklable (move
    tensors to CPU). A rank's exception is re-raised here with the rank's traceback as its cause; ranks still
    running after ``timeout`` seconds (or a few seconds after a peer failed) are killed.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    try:
        pickle.dumps((fn, args))
    except Exception as exc:
        raise TypeError(f"fn and args must be picklable for spawn (module-level function): {exc}") from exc
    try:
        return _run_once(fn, world_size, args, timeout, find_free_port())
    except Exception as exc:
        text = f"{exc}\n{getattr(exc, '__cause__', '') or ''}"
        if "address already in use" not in text.lower() and "EADDRINUSE" not in text:
            raise
    return _run_once(fn, world_size, args, timeout, find_free_port())  # the free port was taken meanwhile
