"""Parent side of the pooled ranks (see ``runner``): start, feed, watch, replace and stop them.

One pool serves every world size: slot ``i`` is rank ``i`` of each job that needs more than ``i`` ranks, so
a 4-rank and a 2-rank job share the first two processes (four processes at most, not 1+2+4). Each slot is a
spawned interpreter running ``rank_worker.pool_worker_main`` in its own process group, talking over a pipe.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.connection
import os
import pickle
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch.multiprocessing as mp

if __package__:
    from . import rank_worker
else:
    import rank_worker

log = logging.getLogger(__name__)

GRACE_S = 5.0  # after one rank fails, how long the others get to finish (or fail) on their own
_MAX_RSS = 3 * 2**30  # a rank above this after its reset is replaced (~0.8 GiB seen after a job)


class WorkerStartError(RuntimeError):
    """A pooled rank could not start (its imports failed, or it died before it was ready)."""


@dataclass
class Outcome:
    """What the ranks of one job reported: payloads by rank, arrival order, hung and dead ranks."""

    payloads: list[tuple[Any, ...] | None]
    order: list[int] = field(default_factory=list)  # ranks that reported, in the order they finished
    hung: list[int] = field(default_factory=list)  # still running at the deadline (or after the grace)
    exitcodes: list[int | None] = field(default_factory=list)  # 0 for a pooled rank that reported


@contextlib.contextmanager
def scoped_environ(updates: dict[str, str]) -> Iterator[None]:
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


def kill_group(proc: Any) -> None:
    """SIGKILL a rank's process group (the rank and any helper it started, e.g. a multiprocessing manager)."""
    if proc.pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the rank called os.setpgrp(), so its pgid is its pid
    if proc.is_alive():
        proc.kill()  # the rank had not reached setpgrp() yet
    proc.join(5.0)


@dataclass
class _Worker:
    proc: Any
    conn: multiprocessing.connection.Connection

    def stop(self) -> None:
        kill_group(self.proc)
        self.conn.close()


class RankPool:
    """Pooled rank processes, started on demand and replaced after a failure or a leak."""

    def __init__(self, start_env: dict[str, str]) -> None:
        self._ctx = mp.get_context("spawn")  # never fork: a forked child of a gloo process can deadlock
        self._start_env = start_env  # set while a worker starts (thread counts are read at import)
        self._slots: list[_Worker | None] = []

    def run(
        self,
        fn: Callable[..., Any],
        world_size: int,
        args: tuple[Any, ...],
        timeout: float,
        port: int,
        env: dict[str, str],
    ) -> Outcome:
        """Run one job on slots ``0..world_size-1``; their processes are replaced unless it succeeded."""
        deadline = time.monotonic() + timeout  # start-up counts, as a fresh rank's imports do
        workers = self._ensure(world_size, deadline)
        job = {"fn": fn, "args": args, "world_size": world_size, "port": port, "timeout": timeout}
        job |= {"env": env, "cwd": os.getcwd()}
        outcome = Outcome([None] * world_size, exitcodes=[0] * world_size)
        leaks: dict[int, list[str]] = {}
        done = False
        try:
            for rank, worker in enumerate(workers):
                with contextlib.suppress(OSError):  # a dead worker shows up as dead below
                    worker.conn.send_bytes(pickle.dumps({**job, "rank": rank}, pickle.HIGHEST_PROTOCOL))
            leaks = self._collect(workers, outcome, deadline)
            done = True
        finally:
            failed = not done or outcome.hung or any(p is None or p[0] != "ok" for p in outcome.payloads)
            for rank in range(world_size):
                if failed or rank in leaks:  # peers of a failed rank may be stuck in a collective
                    self._replace(rank)
        for rank, found in leaks.items():
            if found:
                warnings.warn(
                    f"pooled rank {rank} was replaced after {fn.__module__}.{fn.__qualname__}: {found}",
                    RuntimeWarning,
                    stacklevel=4,  # the test's run_distributed call
                )
        return outcome

    def _collect(self, workers: list[_Worker], outcome: Outcome, deadline: float) -> dict[int, list[str]]:
        """Read every rank's report until all are in, the deadline passes, or a failure's grace is over."""
        pending = dict(enumerate(workers))
        leaks: dict[int, list[str]] = {}
        finished_at: dict[int, float] = {}
        failed_at: float | None = None
        while pending:
            now = time.monotonic()
            limit = deadline if failed_at is None else min(deadline, failed_at + GRACE_S)
            if now >= limit:
                break
            waitables = [w.conn for w in pending.values()] + [w.proc.sentinel for w in pending.values()]
            ready = set(multiprocessing.connection.wait(waitables, timeout=limit - now))
            for rank, worker in list(pending.items()):
                if worker.conn not in ready and worker.proc.sentinel not in ready:
                    continue
                try:
                    _, payload, finished_at[rank], found, report = pickle.loads(worker.conn.recv_bytes())
                except (EOFError, OSError):  # died without a report
                    worker.proc.join(1.0)
                    outcome.exitcodes[rank] = worker.proc.exitcode
                    failed_at = failed_at or time.monotonic()
                    del pending[rank]
                    continue
                outcome.payloads[rank] = pickle.loads(payload)
                del pending[rank]
                log.debug("rank %d: %s; leaks %s", rank, report, found)
                if outcome.payloads[rank][0] != "ok":
                    failed_at = failed_at or time.monotonic()
                elif found:
                    leaks[rank] = found
        outcome.order = sorted(finished_at, key=finished_at.__getitem__)  # as the ranks saw it
        outcome.hung = sorted(pending)
        return leaks

    def _ensure(self, count: int, deadline: float) -> list[_Worker]:
        """The first ``count`` slots, starting (in parallel) those that are empty or dead."""
        while len(self._slots) < count:
            self._slots.append(None)
        starting: dict[int, _Worker] = {}
        for slot in range(count):
            worker = self._slots[slot]
            if worker is None or not worker.proc.is_alive():
                if worker is not None:
                    worker.stop()
                starting[slot] = self._slots[slot] = self._start(slot)
        try:
            self._await_ready(starting, deadline)
        except BaseException:
            for slot in starting:
                self._replace(slot)
            raise
        return [w for w in self._slots[:count] if w is not None]

    def _start(self, slot: int) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        with scoped_environ(self._start_env):
            proc = self._ctx.Process(
                target=rank_worker.pool_worker_main,
                args=(child_conn, _MAX_RSS),
                name=f"mcore-pool-rank{slot}",
                daemon=False,  # non-daemon: jobs may start helpers (checkpoint writer's Manager)
            )
            proc.start()
        child_conn.close()
        return _Worker(proc, parent_conn)

    def _await_ready(self, starting: dict[int, _Worker], deadline: float) -> None:
        pending = dict(starting)
        started = time.monotonic()
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"pooled ranks {sorted(pending)} did not start in time")
            multiprocessing.connection.wait([w.conn for w in pending.values()], timeout=remaining)
            for slot, worker in list(pending.items()):
                if not worker.conn.poll():
                    continue
                try:
                    kind, detail = pickle.loads(worker.conn.recv_bytes())
                except (EOFError, OSError):
                    kind, detail = "dead", f"exit code {worker.proc.exitcode}"
                if kind != "ready":
                    raise WorkerStartError(f"pooled rank {slot} failed to start:\n{detail}")
                log.debug(
                    "pooled rank %d (pid %s) ready after %.1f s", slot, detail, time.monotonic() - started
                )
                del pending[slot]

    def _replace(self, slot: int) -> None:
        """Stop the worker in ``slot``; the next job that needs the slot starts a new one."""
        worker = self._slots[slot]
        self._slots[slot] = None
        if worker is not None:
            log.debug("stopping pooled rank %d (pid %s)", slot, worker.proc.pid)
            worker.stop()

    def shutdown(self) -> None:
        """Stop every worker and its helpers (process groups killed, processes reaped)."""
        for slot in range(len(self._slots)):
            self._replace(slot)
