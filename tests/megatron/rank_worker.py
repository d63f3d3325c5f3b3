"""What runs inside a rank process: the one-shot entry of a fresh rank and the job loop of a pooled one.

Module level only (``spawn`` imports this module in the child); nothing runs at import time. Both entries
share ``run_job``: set the rank's environment, initialise a gloo group on ``tcp://127.0.0.1:PORT`` with the
CPU shim installed, call ``fn(rank, world_size, *args)`` and return the pickled payload, ``("ok", result)``
or ``("err", traceback_text, pickled_exception | None, type_name)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn

ADDR = "127.0.0.1"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def flush_and_exit(code: int) -> NoReturn:
    """Exit without interpreter teardown (seconds with megatron loaded; peers may hang in gloo)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def prepare_rank_process() -> None:
    """Once per rank process, before any job: one thread, the CPU training mode (imports megatron)."""
    warnings.filterwarnings("ignore", message=".*is not installed.*", category=UserWarning)  # TE/Apex/absl
    import torch

    torch.set_num_threads(1)
    from dms_megatron.megatron.patches.cpu_training import enable_cpu_training

    enable_cpu_training()


def _error_payload(exc: BaseException | None, text: str, type_name: str = "") -> bytes:
    blob = None
    if exc is not None:
        with contextlib.suppress(Exception):
            blob = pickle.dumps(exc)
        type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return pickle.dumps(("err", text, blob, type_name), protocol=pickle.HIGHEST_PROTOCOL)


def run_job(
    fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple[Any, ...], timeout: float
) -> tuple[bool, bytes]:
    """Run ``fn`` on this rank inside a new default gloo group; return (ok, pickled payload)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})
    try:
        import torch.distributed as dist

        prepare_rank_process()  # idempotent: a no-op after the first job of a pooled rank
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{ADDR}:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        result = fn(rank, world_size, *args)
    except BaseException as exc:
        return False, _error_payload(exc, traceback.format_exc())
    try:
        return True, pickle.dumps(("ok", result), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        text = "result of rank could not be pickled:\n" + traceback.format_exc()
        return False, _error_payload(None, text, "pickle.PicklingError")


def teardown_distributed() -> None:
    """Destroy megatron's model-parallel state and every torch.distributed group of this process."""
    with contextlib.suppress(Exception):
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# fresh rank: one process per job (the result goes to a file, the process exits)
# ---------------------------------------------------------------------------------------------------------


def _write_result(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # the parent never sees a half-written result


def fresh_rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    args: tuple[Any, ...],
    timeout: float,
) -> None:
    """Entry point of one spawned single-job rank; writes ``rank{rank}.pkl`` into ``out_dir``."""
    os.setpgrp()  # own process group: the parent can kill this rank together with any helper it started
    ok, payload = run_job(fn, rank, world_size, port, args, timeout)
    _write_result(Path(out_dir) / f"rank{rank}.pkl", payload)
    if not ok:
        flush_and_exit(1)  # peers may be stuck in a collective; skip teardown, the parent cleans up
    with contextlib.suppress(Exception):
        teardown_distributed()
    flush_and_exit(0)


# ---------------------------------------------------------------------------------------------------------
# pooled rank: a loop of jobs received over a pipe, the process made to look fresh after each one
# ---------------------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the pytest process dies (even by SIGKILL); best effort."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() == 1:  # the parent died before prctl took effect
            flush_and_exit(1)


def _rss_bytes() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


def _send(conn: Connection, message: tuple[Any, ...]) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def pool_worker_main(conn: Connection, max_rss: int) -> None:
    """Entry point of a pooled rank: import once, then run jobs until the pipe closes.

    Messages to the parent: ``("ready", pid)`` once, or ``("dead", traceback_text)`` if start-up failed;
    then per job ``("done", payload, finished_at, leaks, report)``: ``finished_at`` orders failures,
    ``leaks`` lists what the reset could not undo (the parent then replaces this worker), ``report`` is for
    the debug log. After a failed job the worker exits.
    """
    os.setpgrp()  # own process group, as a fresh rank: killpg also reaps helpers a job left behind
    _die_with_parent()
    try:
        prepare_rank_process()
        if __package__:
            from .rank_reset import ProcessSnapshot
        else:
            from rank_reset import ProcessSnapshot
        snapshot = ProcessSnapshot.capture()
    except BaseException:
        _send(conn, ("dead", traceback.format_exc()))
        flush_and_exit(1)
    _send(conn, ("ready", os.getpid()))
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):  # the parent closed the pool or died
            flush_and_exit(0)
        started = time.perf_counter()
        try:
            job = pickle.loads(message)  # imports fn's module
        except BaseException as exc:
            _send(conn, ("done", _error_payload(exc, traceback.format_exc()), time.time(), [], ""))
            flush_and_exit(1)
        snapshot.track_new_modules()  # job modules imported just now: their pristine state is the baseline
        os.environ.clear()
        os.environ.update(job["env"])  # the parent's environment now, as spawn would copy it
        os.chdir(job["cwd"])
        ok, payload = run_job(
            job["fn"], job["rank"], job["world_size"], job["port"], job["args"], job["timeout"]
        )
        finished_at, ran_s = time.time(), time.perf_counter() - started
        del job
        if not ok:  # peers may be stuck in a collective: leave the clean-up to the parent (killpg)
            _send(conn, ("done", payload, finished_at, [], f"failed after {ran_s:.1f} s"))
            flush_and_exit(1)
        try:
            leaks, reset = snapshot.restore()
        except BaseException:
            leaks, reset = ["reset failed:\n" + traceback.format_exc()], []
        rss = _rss_bytes()
        if rss > max_rss:
            leaks = [*leaks, f"rss {rss / 2**30:.2f} GiB"]  # memory the allocator kept
        report = f"{ran_s:.1f} s + reset {time.perf_counter() - started - ran_s:.2f} s"
        report += f", rss {rss / 2**30:.2f} GiB, reset {len(reset)} names: {sorted(reset)}"
        _send(conn, ("done", payload, finished_at, leaks, report))
