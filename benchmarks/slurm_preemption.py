"""One layout of ``benchmarks/layout_parity.py`` again, submitted as a Slurm job and preempted mid-run.

``sbatch slurm/retrofit_32b.sh`` (or ``retrofit_8b.sh``, by the experiment) runs through the test-only Slurm
stand-ins (``tests/integration/slurm_standin.py``: one node, one task per GPU) on this machine's GPUs. Once
the run has logged ``preempt_after`` steps, SIGUSR1 goes to the job's process group, as Slurm's preemption
warning does; the trainers save and stop, the batch script requeues the job and the second attempt resumes
from that checkpoint to the end. The caller compares the per-step losses with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STANDIN = ROOT / "tests" / "integration" / "slurm_standin.py"
SCRIPTS = {"r1_qwen_32b_cr8": "retrofit_32b.sh", "qwen3_8b_cr8": "retrofit_8b.sh"}
# what torch.distributed prints when a rank's GPU is unknown and NCCL picks one (a hang if it picks wrong)
DEVICE_GUESS = re.compile(r"Guessing device|are currently unknown|No device id is provided", re.I)


def device_guess_warnings(logs: list[Path]) -> list[str]:
    """Lines of the given logs in which NCCL / torch.distributed guessed a rank's device."""
    found = []
    for log in logs:
        if log.is_file():
            found += [
                f"{log.name}: {line.strip()}"
                for line in log.read_text(errors="replace").splitlines()
                if DEVICE_GUESS.search(line)
            ]
    return found


def _stand_ins(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for tool in ("sbatch", "srun", "scontrol"):
        wrapper = folder / tool
        wrapper.write_text(
            f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(STANDIN))} {tool} "$@"\n'
        )
        wrapper.chmod(0o755)
    return folder


def _last_step(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


def preempted_run(
    work: Path, procs: int, overrides: list[str], run_dir: Path, preempt_after: int, seconds: float
) -> tuple[list[dict], dict]:
    """Submit, preempt after ``preempt_after`` logged steps, wait for the requeued attempt to finish.
    Returns the run's metrics rows (every step once) and what the job did."""
    experiments = [o.split("=", 1)[1] for o in overrides if o.startswith(("experiment=", "+experiment="))]
    if len(experiments) != 1 or experiments[0] not in SCRIPTS:
        raise SystemExit(f"--slurm-preempt needs one experiment= override of {sorted(SCRIPTS)}")
    script = ROOT / "slurm" / SCRIPTS[experiments[0]]
    rest = [o for o in overrides if not o.startswith(("experiment=", "+experiment="))]
    state = work / "slurm_state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(
        PATH=f"{_stand_ins(work / 'slurm_bin')}{os.pathsep}{env.get('PATH', '')}",
        SLURM_STANDIN_STATE=str(state),
        PYTHON=sys.executable,
        WANDB_MODE="offline",
    )
    log = work / "slurm_job.log"
    cmd = ["sbatch", "--nodes=1", f"--ntasks-per-node={procs}", f"--output={log}", f"--error={log}"]
    cmd += [str(script), *rest, f"run_dir={run_dir}"]
    print(f"[layout_parity] slurm: {shlex.join(cmd)}", flush=True)
    job = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + seconds
    try:
        while _last_step(run_dir / "metrics.jsonl") < preempt_after:
            if job.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-6000:] if log.is_file() else ""
                raise SystemExit(
                    f"[layout_parity] slurm job ended or stalled before step {preempt_after}\n{tail}"
                )
            time.sleep(0.05)
        (info_file,) = state.glob("job*/job.json")
        os.killpg(json.loads(info_file.read_text())["pgid"], signal.SIGUSR1)
        print(f"[layout_parity] slurm: SIGUSR1 to the job after step {preempt_after}", flush=True)
        job.communicate(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if job.poll() is None:
            job.terminate()
            job.wait(timeout=60)
    text = log.read_text(errors="replace")
    info = json.loads(info_file.read_text())
    stopped = re.search(r"preempted: checkpoint saved at step (\d+)", text)
    resumed = re.search(r"resumed from \S+ at step (\d+)", text)
    result = {
        "exit_code": job.returncode,
        "attempts": [a.get("exit_code") for a in info.get("attempts", [])],
        "restarts": info.get("restarts"),
        "stopped_at_step": int(stopped.group(1)) if stopped else None,
        "resumed_at_step": int(resumed.group(1)) if resumed else None,
        "finished": "run finished at step" in text,
        "log": str(log),
    }
    print(f"[layout_parity] slurm: {json.dumps(result)}", flush=True)
    if job.returncode != 0 or not result["finished"] or result["resumed_at_step"] is None:
        raise SystemExit(
            "[layout_parity] the Slurm run was not preempted, requeued and resumed to the end\n"
            + text[-6000:]
        )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows, result
