"""A stand-in for ``python launch/retrofit.py`` in the tests of the control flow of ``slurm/*.sh`` (signals,
requeue, failures): no torch, done in a moment. Called as ``slurm_fake_trainer.py launch/retrofit.py
[--print-config[=KEY]] OVERRIDES...``; only ``run_dir=`` is read from the overrides.

- ``--print-config``: prints ``run_dir: ...`` (``--print-config=run_dir``: the run directory).
- a training task (``RANK`` set): records its rank variables and the signals it got in
  ``run_dir/task<RANK>.<SLURM_RESTART_COUNT>.json``. ``FAKE_MODE=fail``: rank 0 exits 3, the others hang
  (so only ``srun --kill-on-bad-exit`` ends the step). Otherwise the first
  attempt touches ``run_dir/ready<RANK>`` and waits up to ``FAKE_WAIT`` seconds for SIGUSR1; rank 0 then
  writes ``summary.json`` as the trainer does (preempted if SIGUSR1 came, else finished); later attempts
  finish at once."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")


def main(args: list[str]) -> int:
    overrides = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
    run_dir = Path(overrides.get("run_dir", "runs/fake"))
    printing = [a for a in args if a.startswith("--print-config")]
    if printing:
        print(run_dir if printing[0] == "--print-config=run_dir" else f"run_dir: {run_dir}")
        return 0
    got: list[str] = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: got.append(signal.Signals(signum).name))
    rank = int(os.environ["RANK"])
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    run_dir.mkdir(parents=True, exist_ok=True)
    if os.environ.get("FAKE_MODE") == "fail":  # rank 0 fails; the others hang until srun kills them
        if rank == 0:
            return 3
        time.sleep(60)
        return 0
    preempted = False
    if restart == 0:
        (run_dir / f"ready{rank}").touch()
        deadline = time.monotonic() + float(os.environ.get("FAKE_WAIT", "30"))
        while "SIGUSR1" not in got and time.monotonic() < deadline:
            time.sleep(0.02)
        preempted = "SIGUSR1" in got
    record = {"env": {k: os.environ.get(k) for k in ENV}, "signals": got}
    (run_dir / f"task{rank}.{restart}.json").write_text(json.dumps(record))
    if rank == 0:
        summary = {"step": 3 if preempted else 8, "preempted": preempted, "finished": not preempted}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[2:]))
