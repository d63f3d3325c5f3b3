"""Test-only stand-ins for Slurm's ``sbatch``, ``srun`` and ``scontrol`` on one machine: enough of their
behaviour to run ``slurm/*.sh`` end to end on CPU (``tests/integration/test_slurm_launch.py`` puts small
wrappers named after the tools first on PATH; each runs ``python slurm_standin.py TOOL ARGS...``).

- ``sbatch [options] script [args]``: reads the script's ``#SBATCH`` header (up to its first command), then
  the command-line options (which win); rejects options and values it does not know, as sbatch does. Runs a
  copy of the script from a spool folder (Slurm does too, so a script cannot find its repository through
  its own path) in the foreground, in a process group of its own (``job.json`` records it), with a Slurm-like
  environment (``SLURM_JOB_ID``, ``SLURM_JOB_NODELIST``, ``SLURM_NNODES``, ``SLURM_NTASKS``,
  ``SLURM_CPUS_ON_NODE``, ``SLURM_SUBMIT_DIR``, ...); stdout/stderr go to ``--output`` / ``--error`` (``%j``,
  ``%x``; ``--open-mode``). When the script has ended, the job's remaining processes are killed (as Slurm
  does) and a requeue asked for with ``scontrol requeue`` runs the job again with ``SLURM_RESTART_COUNT`` + 1
  (at most 5 times). Prints "Submitted batch job N" first and exits with the job's last exit status.
- ``srun [options] command``: inside a job, starts the step's tasks here, in block distribution, with
  ``SLURM_PROCID`` / ``SLURM_LOCALID`` / ``SLURM_NODEID`` / ``SLURM_NTASKS`` / ``SLURM_STEP_ID``; passes
  SIGUSR1, SIGUSR2 and SIGCONT on to its tasks and answers SIGTERM / SIGINT / SIGHUP / SIGQUIT by killing them
  (SIGKILL), as the real srun does; ``--kill-on-bad-exit`` (the step then exits with the failing task's
  status); refuses pyxis' ``--container-*`` options.
- ``scontrol show hostnames [LIST]`` and ``scontrol requeue JOBID``.

Every job's state lives in ``$SLURM_STANDIN_STATE/job<ID>/``; ``SLURM_STANDIN_CPUS_PER_NODE`` sets the CPUs
of a node (default: this machine's). Nodes beyond the first are simulated here too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

STATE_ENV = "SLURM_STANDIN_STATE"
MAX_RESTARTS = 5

# long option -> whether it takes a value (None: an optional "=value")
SBATCH_OPTIONS: dict[str, bool | None] = {
    "account": True,
    "chdir": True,
    "constraint": True,
    "cpus-per-task": True,
    "dependency": True,
    "error": True,
    "exclusive": None,
    "export": True,
    "gpus": True,
    "gpus-per-node": True,
    "gres": True,
    "job-name": True,
    "mail-type": True,
    "mail-user": True,
    "mem": True,
    "nodes": True,
    "no-requeue": False,
    "ntasks": True,
    "ntasks-per-node": True,
    "open-mode": True,
    "output": True,
    "parsable": False,
    "partition": True,
    "qos": True,
    "requeue": False,
    "reservation": True,
    "signal": True,
    "time": True,
}
SBATCH_SHORT = {
    "A": "account",
    "C": "constraint",
    "D": "chdir",
    "G": "gpus",
    "J": "job-name",
    "N": "nodes",
    "c": "cpus-per-task",
    "d": "dependency",
    "e": "error",
    "n": "ntasks",
    "o": "output",
    "p": "partition",
    "q": "qos",
    "t": "time",
}
SRUN_OPTIONS: dict[str, bool | None] = {
    "container-image": True,
    "container-mounts": True,
    "container-name": True,
    "container-workdir": True,
    "cpu-bind": True,
    "cpus-per-task": True,
    "export": True,
    "gpus-per-node": True,
    "kill-on-bad-exit": None,
    "mpi": True,
    "nodes": True,
    "ntasks": True,
    "ntasks-per-node": True,
    "unbuffered": False,
}
SRUN_SHORT = {"K": "kill-on-bad-exit", "N": "nodes", "c": "cpus-per-task", "n": "ntasks", "u": "unbuffered"}
FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT)
FATAL = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def die(tool: str, message: str) -> NoReturn:
    print(f"{tool}: error: {message}", file=sys.stderr)
    sys.exit(1)


def parse_options(
    tool: str, args: list[str], table: dict[str, bool | None], short: dict[str, str]
) -> tuple[dict[str, str | bool], list[str]]:
    """Options up to the first positional argument (or ``--``); the rest is returned unparsed."""
    opts: dict[str, str | bool] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name not in table:
                die(tool, f"unrecognized option '--{name}'")
            takes = table[name]
            if takes is True and not eq:
                i += 1
                if i >= len(args):
                    die(tool, f"option '--{name}' requires an argument")
                value = args[i]
            elif takes is False and eq:
                die(tool, f"option '--{name}' doesn't allow an argument")
            opts[name] = value if (eq or takes is True) else True
        elif arg.startswith("-") and len(arg) > 1:
            name = short.get(arg[1]) or die(tool, f"invalid option -- '{arg[1]}'")
            takes = table[name]
            value = arg[2:]
            if takes is True and not value:
                i += 1
                if i >= len(args):
                    die(tool, f"option '-{arg[1]}' requires an argument")
                value = args[i]
            opts[name] = value or True
        else:
            break
        i += 1
    return opts, args[i:]


def header_options(script: Path) -> list[str]:
    """The ``#SBATCH`` arguments of a batch script: comment lines up to its first command."""
    out: list[str] = []
    for line in script.read_text().splitlines()[1:]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        if stripped.startswith("#SBATCH"):
            out.extend(shlex.split(stripped[len("#SBATCH") :]))
    return out


def validate_sbatch(opts: dict[str, str | bool]) -> None:
    def positive(name: str) -> None:
        value = str(opts.get(name, "1")).split("-")[0]
        if not value.isdigit() or int(value) < 1:
            die("sbatch", f"invalid --{name} '{opts[name]}'")

    for name in ("nodes", "ntasks", "ntasks-per-node", "cpus-per-task"):
        positive(name)
    time_re = r"^(\d+-)?\d+(:\d+){0,2}$|^\d+-\d+$|^(UNLIMITED|INFINITE)$"
    if "time" in opts and not re.match(time_re, str(opts["time"])):
        die("sbatch", f"Invalid --time specification '{opts['time']}'")
    if "signal" in opts:
        m = re.match(r"^(?:[RB]:)?([A-Z0-9]+)(?:@(\d+))?$", str(opts["signal"]))
        sig = m and m.group(1)
        if not sig or not (sig.isdigit() or hasattr(signal, "SIG" + sig)):
            die("sbatch", f"Invalid --signal specification '{opts['signal']}'")
    if opts.get("open-mode", "truncate") not in ("append", "truncate"):
        die("sbatch", f"Invalid --open-mode '{opts['open-mode']}'")
    if "requeue" in opts and "no-requeue" in opts:
        die("sbatch", "--requeue and --no-requeue together")


def state_dir() -> Path:
    path = os.environ.get(STATE_ENV) or tempfile.mkdtemp(prefix="slurm_standin_")
    os.environ[STATE_ENV] = path
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def job_dir(job_id: str) -> Path:
    return state_dir() / f"job{job_id}"


def new_job_dir() -> tuple[int, Path]:
    root = state_dir()
    job_id = 1001
    while True:
        try:
            (root / f"job{job_id}").mkdir()
            return job_id, root / f"job{job_id}"
        except FileExistsError:
            job_id += 1


def hostnames(nnodes: int) -> list[str]:
    return ["localhost"] + [f"standin-node{i}" for i in range(1, nnodes)]


def expand_hostlist(hostlist: str) -> list[str]:
    """``node[01-03,7],gpu5`` -> node01 node02 node03 node7 gpu5."""
    out: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", hostlist):
        m = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", part)
        if not m:
            out.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for rng in ranges.split(","):
            lo, _, hi = rng.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                out.extend(expand_hostlist(f"{prefix}{str(n).zfill(len(lo))}{suffix}"))
    return out


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def sbatch(args: list[str]) -> int:
    cli, rest = parse_options("sbatch", args, SBATCH_OPTIONS, SBATCH_SHORT)
    if not rest:
        die("sbatch", "no batch script given (the stand-in does not read one from stdin)")
    script, script_args = Path(rest[0]), rest[1:]
    if not script.is_file():
        die("sbatch", f"Unable to open file {script}")
    if not script.read_text().startswith("#!"):
        die("sbatch", "This does not look like a batch script. The first line must start with #!")
    opts, extra = parse_options("sbatch", header_options(script), SBATCH_OPTIONS, SBATCH_SHORT)
    if extra:
        die("sbatch", f"unexpected #SBATCH arguments {extra}")
    opts.update(cli)
    validate_sbatch(opts)

    nnodes = int(str(opts.get("nodes", 1)).split("-")[0])
    per_node = int(str(opts.get("ntasks-per-node", 1)))
    ntasks = int(str(opts["ntasks"])) if "ntasks" in opts else nnodes * per_node
    cpus = int(os.environ.get("SLURM_STANDIN_CPUS_PER_NODE") or os.cpu_count() or 1)
    submit_dir = os.getcwd()
    workdir = str(opts.get("chdir", submit_dir))
    name = str(opts.get("job-name", script.name))
    job_id, spool = new_job_dir()
    copy = spool / "slurm_script"
    shutil.copyfile(script, copy)
    copy.chmod(0o700)
    print(job_id if opts.get("parsable") else f"Submitted batch job {job_id}", flush=True)

    hosts = hostnames(nnodes)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SLURMD_"))}
    env.update(
        {
            STATE_ENV: str(state_dir()),
            "SLURM_JOB_ID": str(job_id),
            "SLURM_JOBID": str(job_id),
            "SLURM_JOB_NAME": name,
            "SLURM_JOB_NODELIST": ",".join(hosts),
            "SLURM_NODELIST": ",".join(hosts),
            "SLURM_NNODES": str(nnodes),
            "SLURM_JOB_NUM_NODES": str(nnodes),
            "SLURM_NTASKS": str(ntasks),
            "SLURM_NPROCS": str(ntasks),
            "SLURM_TASKS_PER_NODE": f"{math.ceil(ntasks / nnodes)}(x{nnodes})",
            "SLURM_CPUS_ON_NODE": str(cpus),
            "SLURM_JOB_CPUS_PER_NODE": f"{cpus}(x{nnodes})",
            "SLURM_SUBMIT_DIR": submit_dir,
            "SLURM_SUBMIT_HOST": socket.gethostname(),
            "SLURM_CLUSTER_NAME": "standin",
            "SLURM_JOB_PARTITION": str(opts.get("partition", "standin")),
            "SLURMD_NODENAME": hosts[0],
            "SLURM_NODEID": "0",
            "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0",
        }
    )
    for opt, var in (
        ("ntasks-per-node", "SLURM_NTASKS_PER_NODE"),
        ("gpus-per-node", "SLURM_GPUS_PER_NODE"),
        ("cpus-per-task", "SLURM_CPUS_PER_TASK"),
    ):
        if opt in opts:
            env[var] = str(opts[opt])

    def log_path(option: str) -> str:
        pattern = str(opts.get(option) or opts.get("output") or "slurm-%j.out")
        path = pattern.replace("%j", str(job_id)).replace("%x", name)
        return path if os.path.isabs(path) else os.path.join(workdir, path)

    info: dict = {"job_id": job_id, "options": opts, "args": script_args, "restarts": 0, "attempts": []}
    current: dict[str, int] = {}

    def cancel(signum: int, _frame: object) -> None:  # sbatch itself stopped (a test timed out): end the job
        if "pgid" in current:
            with_pgid(current["pgid"], signal.SIGKILL)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, cancel)
    signal.signal(signal.SIGINT, cancel)
    restarts = 0
    mode = "a" if opts.get("open-mode") == "append" else "w"
    while True:
        if restarts:
            env["SLURM_RESTART_COUNT"] = str(restarts)
        out_path, err_path = log_path("output"), log_path("error")
        with contextlib.ExitStack() as files:
            out = files.enter_context(open(out_path, mode))
            err = out if err_path == out_path else files.enter_context(open(err_path, mode))
            proc = subprocess.Popen(
                [str(copy), *script_args],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # the job's own process group (Slurm: the job's cgroup)
            )
            current["pgid"] = proc.pid
            info.update(pgid=proc.pid, batch_pid=proc.pid, restarts=restarts, state="RUNNING")
            write_json(spool / "job.json", info)
            rc = proc.wait()
        rc = 128 - rc if rc < 0 else rc
        with_pgid(proc.pid, signal.SIGKILL)  # what the batch script left behind ends with the job
        info["attempts"].append({"restart": restarts, "exit_code": rc})
        flag = spool / "requeue"
        if not flag.exists() or restarts >= MAX_RESTARTS:
            break
        flag.unlink()
        restarts += 1
        print(f"sbatch (stand-in): job {job_id} requeued, restart {restarts}", file=sys.stderr, flush=True)
    info.update(state="COMPLETED" if rc == 0 else "FAILED", exit_code=rc)
    write_json(spool / "job.json", info)
    return rc


def with_pgid(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def srun(args: list[str]) -> int:
    opts, command = parse_options("srun", args, SRUN_OPTIONS, SRUN_SHORT)
    if any(k.startswith("container-") for k in opts):
        die("srun", "pyxis --container-* options are not supported by the stand-in")
    if not command:
        die("srun", "no command given")
    if "SLURM_JOB_ID" not in os.environ:
        die("srun", "the stand-in runs steps of an sbatch job only (no SLURM_JOB_ID)")
    job_nodes = int(os.environ["SLURM_NNODES"])
    nnodes = int(str(opts.get("nodes", job_nodes)))
    if nnodes > job_nodes:
        die("srun", f"Only allocated {job_nodes} nodes asked for {nnodes}")
    if "ntasks" in opts:
        ntasks = int(str(opts["ntasks"]))
    elif "ntasks-per-node" in opts:
        ntasks = nnodes * int(str(opts["ntasks-per-node"]))
    elif "nodes" in opts:
        ntasks = nnodes
    else:
        ntasks = int(os.environ["SLURM_NTASKS"])
    per_node = int(str(opts.get("ntasks-per-node", math.ceil(ntasks / nnodes))))
    if ntasks > nnodes * per_node:
        die("srun", f"{ntasks} tasks do not fit {nnodes} nodes x {per_node} tasks")
    cpt = int(str(opts.get("cpus-per-task", 1)))
    if cpt * per_node > int(os.environ.get("SLURM_CPUS_ON_NODE", "1")):
        die("srun", "More processors requested than permitted")
    spool = job_dir(os.environ["SLURM_JOB_ID"])
    steps = spool / "steps"
    steps.mkdir(exist_ok=True)
    step_id = len(list(steps.glob("*.json")))
    hosts = hostnames(job_nodes)[:nnodes]

    procs: list[subprocess.Popen] = []
    killed = False

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signum)

    def terminate(signum: int, _frame: object) -> None:
        nonlocal killed
        print(
            f"srun: got {signal.Signals(signum).name}: forcing job termination", file=sys.stderr, flush=True
        )
        killed = True
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    for sig in FATAL:
        signal.signal(sig, terminate)
    for rank in range(ntasks):
        node = rank // per_node
        env = {
            **os.environ,
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank % per_node),
            "SLURM_NODEID": str(node),
            "SLURMD_NODENAME": hosts[node],
            "SLURM_NTASKS": str(ntasks),
            "SLURM_NPROCS": str(ntasks),
            "SLURM_NNODES": str(nnodes),
            "SLURM_STEP_ID": str(step_id),
            "SLURM_STEPID": str(step_id),
            "SLURM_STEP_NUM_TASKS": str(ntasks),
            "SLURM_STEP_NUM_NODES": str(nnodes),
            "SLURM_STEP_NODELIST": ",".join(hosts),
            "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nnodes})",
            "SLURM_CPUS_PER_TASK": str(cpt),
        }
        procs.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL))
    write_json(steps / f"{step_id}.json", {"command": command, "pids": [p.pid for p in procs]})

    kill_on_bad_exit = str(opts.get("kill-on-bad-exit", "0")) in ("1", "True")
    reported: set[int] = set()
    first_bad: int | None = None  # the exit status that made --kill-on-bad-exit end the step
    while any(p.poll() is None for p in procs):
        for rank, p in enumerate(procs):
            code = p.poll()
            if code not in (None, 0) and rank not in reported:
                reported.add(rank)
                print(f"srun: error: task {rank}: Exited with exit code {code}", file=sys.stderr, flush=True)
                if kill_on_bad_exit and not killed:
                    first_bad = code if code > 0 else 128 - code
                    terminate(signal.SIGTERM, None)
        time.sleep(0.05)
    codes = [128 - c if c < 0 else c for c in (p.returncode for p in procs)]
    # A step ended by --kill-on-bad-exit reports the failing task's status, not the SIGKILL it sent the
    # others (otherwise the result would depend on which task happened to exit first).
    return first_bad if first_bad is not None else max(codes)


def scontrol(args: list[str]) -> int:
    if args[:2] == ["show", "hostnames"]:
        hostlist = args[2] if len(args) > 2 else os.environ.get("SLURM_JOB_NODELIST")
        if not hostlist:
            die("scontrol", "no hostlist given and SLURM_JOB_NODELIST is not set")
        print("\n".join(expand_hostlist(hostlist)))
        return 0
    if args[:1] == ["requeue"] and len(args) == 2:
        spool = job_dir(args[1])
        if not (spool / "job.json").is_file():
            die("scontrol", f"Invalid job id specified for job {args[1]}")
        info = json.loads((spool / "job.json").read_text())
        if "no-requeue" in info["options"]:
            die("scontrol", f"Requested operation is presently disabled for job {args[1]}")
        (spool / "requeue").write_text(f"{time.time()}\n")
        return 0
    die("scontrol", f"the stand-in does not implement: scontrol {shlex.join(args)}")


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("sbatch", "srun", "scontrol"):
        print("usage: slurm_standin.py {sbatch,srun,scontrol} ARGS...", file=sys.stderr)
        return 2
    tool = {"sbatch": sbatch, "srun": srun, "scontrol": scontrol}[sys.argv[1]]
    return tool(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
