# shellcheck shell=bash
# Shared functions of the sbatch scripts in slurm/ (sourced by them, never run on its own). They only
# prepare the environment and start the same entry point as a local run, launch/retrofit.py, once per
# GPU; every knob is an environment variable (slurm/README.md lists them) or a Hydra override.
#
#   dms_main PRESET_OVERRIDE... -- USER_OVERRIDE...
#
# Launch model: `srun` starts one task per GPU and each task maps Slurm's task variables to the ones
# torch.distributed and Megatron read (RANK, WORLD_SIZE, LOCAL_RANK; MASTER_ADDR/PORT come from the
# allocation). Slurm's preemption warning (SIGUSR1) thereby reaches every trainer process directly; the
# trainer saves a checkpoint and exits 0, and this script requeues the job when the run summary says
# "preempted" and not "finished". The next start resumes from the checkpoint (train.resume=auto).

DMS_TAG="[dms-slurm]"

dms_log() {
  printf '%s %s %s\n' "$DMS_TAG" "$(date -u +%H:%M:%S)" "$*" >&2
}

dms_die() {
  dms_log "error: $*"
  exit 1
}

# dms_quote ARG...: the arguments as one line a shell reads back as the same words (plain words bare)
dms_quote() {
  local a out=()
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./=:,+@%^-]+$ ]]; then
      out+=("$a")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

dms_is_uint() {
  [[ $1 =~ ^[0-9]+$ ]]
}

# The Python of the run: PYTHON, else VENV/bin/python, else the container's `python`, else `python3` from
# PATH (sbatch passes the submitting shell's environment on, so an activated environment works too).
dms_setup_python() {
  if [[ -n ${PYTHON:-} ]]; then
    DMS_PYTHON=$PYTHON
  elif [[ -n ${VENV:-} ]]; then
    if [[ -z ${CONTAINER_IMAGE:-} && ! -x $VENV/bin/python ]]; then
      dms_die "VENV=$VENV has no bin/python (create it with: make setup VENV=$VENV)"
    fi
    DMS_PYTHON=$VENV/bin/python
    export VIRTUAL_ENV=$VENV
    export PATH="$VENV/bin:$PATH"
  elif [[ -n ${CONTAINER_IMAGE:-} ]]; then
    DMS_PYTHON=python
  else
    DMS_PYTHON=python3
  fi
}

# NCCL / CUDA / PyTorch settings for Megatron on H100 nodes; a value already set in the environment wins.
dms_setup_env() {
  # megatron's TP/SP communication overlap relies on one hardware queue per device (in-order kernels)
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  # a failed or timed-out collective (the process group timeout is 30 min) aborts the process, so that
  # srun --kill-on-bad-exit ends the job instead of leaving the other ranks hanging until the time limit
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}  # NVLink SHARP (multicast) off: not needed, fragile
  export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  export PYTHONUNBUFFERED=1
  export HYDRA_FULL_ERROR=${HYDRA_FULL_ERROR:-1}
}

# W&B: WANDB_API_KEY, WANDB_MODE, WANDB_ENTITY, ... reach every task unchanged (srun passes the environment
# on); WANDB_PROJECT becomes the logging.wandb_project override. Without any W&B login the run logs offline
# rather than failing at wandb.init on nodes without internet access. The W&B run id is tied to the Slurm
# job id, so a requeued job continues its W&B run.
dms_setup_wandb() {
  local netrc=${NETRC:-${HOME:-}/.netrc}
  if [[ -z ${WANDB_MODE:-} && -z ${WANDB_API_KEY:-} ]] && ! grep -qs 'api.wandb.ai' "$netrc"; then
    export WANDB_MODE=offline
    dms_log "W&B: no WANDB_API_KEY and no login in $netrc: WANDB_MODE=offline" \
      "(upload later with: wandb sync RUN_DIR/wandb/offline-run-*)"
  fi
  if [[ -n ${SLURM_JOB_ID:-} ]]; then
    export WANDB_RUN_ID=${WANDB_RUN_ID:-dms-$SLURM_JOB_ID}
    export WANDB_RESUME=${WANDB_RESUME:-allow}
  fi
}

# Layout and rendezvous from the allocation: DMS_NNODES, DMS_TASKS_PER_NODE, DMS_WORLD, MASTER_ADDR,
# MASTER_PORT, DMS_CPUS_PER_TASK. Outside an allocation (DRY_RUN on a login node) NODES / GPUS_PER_NODE or
# the script's defaults stand in.
dms_rendezvous() {
  DMS_NNODES=${SLURM_NNODES:-${NODES:-$DMS_DEFAULT_NODES}}
  DMS_TASKS_PER_NODE=${GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-8}}
  if ! dms_is_uint "$DMS_NNODES" || ((DMS_NNODES == 0)); then
    dms_die "bad node count: $DMS_NNODES"
  fi
  if ! dms_is_uint "$DMS_TASKS_PER_NODE" || ((DMS_TASKS_PER_NODE == 0)); then
    dms_die "bad tasks (GPUs) per node: $DMS_TASKS_PER_NODE"
  fi
  DMS_WORLD=$((DMS_NNODES * DMS_TASKS_PER_NODE))
  if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
    local hosts=()
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    ((${#hosts[@]} > 0)) || dms_die "scontrol show hostnames $SLURM_JOB_NODELIST printed no host"
    export MASTER_ADDR=${hosts[0]}
  else
    export MASTER_ADDR="FIRST_NODE_OF_THE_ALLOCATION"
  fi
  # a port per job: two jobs sharing a node do not collide, a requeued job gets its port back
  export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 10000))}
  DMS_CPUS_PER_TASK=${CPUS_PER_TASK:-}
  if [[ -z $DMS_CPUS_PER_TASK && -n ${SLURM_CPUS_ON_NODE:-} ]] && dms_is_uint "$SLURM_CPUS_ON_NODE"; then
    # without it each task is bound to one core (srun's default of one CPU per task)
    DMS_CPUS_PER_TASK=$((SLURM_CPUS_ON_NODE / DMS_TASKS_PER_NODE))
    ((DMS_CPUS_PER_TASK > 0)) || DMS_CPUS_PER_TASK=1
  fi
}

# pyxis/enroot flags when CONTAINER_IMAGE is set: the repository is mounted at its own path (and is the
# working directory), CONTAINER_MOUNTS adds more (comma-separated src:dst, e.g. data and checkpoints).
dms_container_args() {
  DMS_CONTAINER_ARGS=()
  [[ -n ${CONTAINER_IMAGE:-} ]] || return 0
  local mounts="$DMS_ROOT:$DMS_ROOT"
  [[ -z ${CONTAINER_MOUNTS:-} ]] || mounts+=",$CONTAINER_MOUNTS"
  DMS_CONTAINER_ARGS=(
    --container-image="$CONTAINER_IMAGE"
    --container-mounts="$mounts"
    --container-workdir="$DMS_ROOT"
    --container-name="${CONTAINER_NAME:-dms_megatron}"
  )
}

# Each task exports the rank variables torch.distributed (env://) and Megatron read, then becomes the
# trainer (exec), so that signals sent to the task reach the trainer itself.
# shellcheck disable=SC2016  # expanded by the task's shell, not here
DMS_TASK_SNIPPET='export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$@"'

# DMS_LAUNCH: the srun command line of the training step.
dms_build_launch() {
  local extra=()
  [[ -z ${SRUN_ARGS:-} ]] || read -r -a extra <<<"$SRUN_ARGS"
  DMS_LAUNCH=(srun --nodes="$DMS_NNODES" --ntasks-per-node="$DMS_TASKS_PER_NODE" --ntasks="$DMS_WORLD")
  [[ -z $DMS_CPUS_PER_TASK ]] || DMS_LAUNCH+=(--cpus-per-task="$DMS_CPUS_PER_TASK")
  DMS_LAUNCH+=(--kill-on-bad-exit=1)
  DMS_LAUNCH+=(${DMS_CONTAINER_ARGS[@]+"${DMS_CONTAINER_ARGS[@]}"} ${extra[@]+"${extra[@]}"})
  DMS_LAUNCH+=(bash -c "$DMS_TASK_SNIPPET" dms-task "$DMS_PYTHON" launch/retrofit.py "${DMS_OVERRIDES[@]}")
}

# The command that runs a Python helper in the training environment: inside the container as a
# one-task step when there is one (and an allocation), else the Python of the run directly.
dms_helper_python() {
  DMS_HELPER=("$DMS_PYTHON")
  if [[ -n ${CONTAINER_IMAGE:-} && -n ${SLURM_JOB_ID:-} && ${DRY_RUN:-0} == 0 ]]; then
    DMS_HELPER=(srun --nodes=1 --ntasks=1 "${DMS_CONTAINER_ARGS[@]}" "$DMS_PYTHON")
  fi
}

# dms_json_field KEY FILE: a top-level scalar of a JSON file written by json.dumps(indent=2)
dms_json_field() {
  local line re="^  \"$1\": ([^,]*),?$"
  while IFS= read -r line; do
    if [[ $line =~ $re ]]; then
      printf '%s\n' "${BASH_REMATCH[1]}"
      return 0
    fi
  done <"$2"
  return 1
}

# Signals that reach the batch shell: SIGUSR1 (sbatch --signal=B:USR1@..., scancel --batch -s USR1) is
# passed to srun, which passes it to every task; SIGTERM is only noted: srun answers SIGTERM by killing
# the tasks (SIGKILL), which would lose the preemption checkpoint. The tasks get Slurm's own signals.
dms_on_signal() {
  DMS_SIGNALLED=1
  dms_log "batch shell received SIG$1"
  if [[ $1 == USR1 && -n ${DMS_SRUN_PID:-} ]]; then
    dms_log "passing SIGUSR1 to srun (pid $DMS_SRUN_PID): every task checkpoints and stops"
    kill -s USR1 "$DMS_SRUN_PID" 2>/dev/null || true
  fi
}

# Requeue after a clean preemption stop (the trainer saved a checkpoint and exited 0).
dms_requeue() {
  local restarts=${SLURM_RESTART_COUNT:-0} max=${MAX_REQUEUES:-20}
  if [[ ${REQUEUE:-1} == 0 ]]; then
    dms_log "REQUEUE=0: not requeueing; submit the same command again to resume"
    return 0
  fi
  if ((restarts >= max)); then
    dms_log "the job was requeued $restarts times (MAX_REQUEUES=$max): not again; resubmit to resume"
    return 1
  fi
  dms_log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1))); it resumes from the checkpoint"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    dms_log "scontrol requeue $SLURM_JOB_ID failed (job submitted with --no-requeue?); resubmit to resume"
    return 1
  fi
}

dms_main() {
  local preset=() arg
  while (($# > 0)) && [[ $1 != -- ]]; do
    preset+=("$1")
    shift
  done
  if (($# > 0)); then
    shift  # the --
  fi
  for arg in "$@"; do
    case $arg in
      -m | --multirun) dms_die "$arg (a Hydra sweep) is not supported here: submit one job per setting" ;;
      --*) dms_die "unknown option $arg: pass Hydra overrides (key=value) only" ;;
    esac
  done
  cd "$DMS_ROOT" || dms_die "cannot cd to $DMS_ROOT"

  dms_setup_python
  dms_setup_env
  dms_setup_wandb
  dms_rendezvous
  dms_container_args
  DMS_OVERRIDES=(${preset[@]+"${preset[@]}"})
  [[ -z ${WANDB_PROJECT:-} ]] || DMS_OVERRIDES+=("logging.wandb_project=$WANDB_PROJECT")
  DMS_OVERRIDES+=("$@")  # last: the command line wins over the preset
  dms_build_launch
  dms_helper_python
  # validates the config and that the world size fits its layout (a multiple of TP x PP, ...)
  DMS_CHECK=(--world-size="$DMS_WORLD" --print-config)

  if [[ ${DRY_RUN:-0} != 0 ]]; then
    echo "# DRY_RUN=$DRY_RUN: nothing is started. Launch command (from $DMS_ROOT):"
    dms_quote "${DMS_LAUNCH[@]}"
    echo "# $DMS_NNODES node(s) x $DMS_TASKS_PER_NODE tasks = world size $DMS_WORLD;" \
      "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
    echo "# environment: CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS" \
      "TORCH_NCCL_ASYNC_ERROR_HANDLING=$TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG=$NCCL_DEBUG" \
      "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE OMP_NUM_THREADS=$OMP_NUM_THREADS WANDB_MODE=${WANDB_MODE:-}"
    echo "# resolved config ($(dms_quote "${DMS_HELPER[@]}" launch/retrofit.py "${DMS_CHECK[@]}")):"
    "${DMS_HELPER[@]}" launch/retrofit.py "${DMS_CHECK[@]}" "${DMS_OVERRIDES[@]}" ||
      dms_die "the config does not compose, validate or fit $DMS_NNODES node(s) x $DMS_TASKS_PER_NODE" \
        "GPUs (see above)"
    return
  fi

  [[ -n ${SLURM_JOB_ID:-} ]] || dms_die "not inside a Slurm job: submit with sbatch (or set DRY_RUN=1)"
  DMS_SIGNALLED=0
  DMS_SRUN_PID=
  trap 'dms_on_signal USR1' USR1
  trap 'dms_on_signal TERM' TERM
  dms_log "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}:" \
    "$DMS_NNODES node(s) x $DMS_TASKS_PER_NODE tasks, MASTER_ADDR=$MASTER_ADDR:$MASTER_PORT," \
    "repository $DMS_ROOT ($(git -C "$DMS_ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
  dms_log "resolved config:"
  "${DMS_HELPER[@]}" launch/retrofit.py "${DMS_CHECK[@]}" "${DMS_OVERRIDES[@]}" >&2 ||
    dms_die "the config does not compose or validate, or does not fit $DMS_NNODES node(s) x" \
      "$DMS_TASKS_PER_NODE GPUs (see above)"
  local run_dir
  run_dir=$("${DMS_HELPER[@]}" launch/retrofit.py --print-config=run_dir "${DMS_OVERRIDES[@]}")
  local summary="$run_dir/summary.json"
  rm -f "$summary"  # a summary left by an earlier attempt must not be mistaken for this one's
  if ((DMS_SIGNALLED)); then
    dms_log "preemption signal before the launch: not starting the run"
    dms_requeue
    return
  fi

  dms_log "launch: $(dms_quote "${DMS_LAUNCH[@]}")"
  "${DMS_LAUNCH[@]}" &
  DMS_SRUN_PID=$!
  local rc=0 status have_rc=0
  while :; do  # a trapped signal interrupts `wait`; wait again until srun itself has ended
    DMS_SIGNALLED=0
    status=0
    wait "$DMS_SRUN_PID" || status=$?
    ((status == 127 && have_rc)) && break  # srun was already reaped by the previous wait
    rc=$status
    have_rc=1
    ((DMS_SIGNALLED)) || break
  done
  # the traps stay: `scontrol requeue` below makes Slurm signal this shell, which then still ends with 0

  if ((rc != 0)); then
    dms_log "srun exited with status $rc: the run failed or was killed; not requeueing"
    return "$rc"
  fi
  [[ -f $summary ]] || dms_die "srun exited 0 but wrote no $summary"
  local finished preempted step
  finished=$(dms_json_field finished "$summary") || finished=unknown
  preempted=$(dms_json_field preempted "$summary") || preempted=unknown
  step=$(dms_json_field step "$summary") || step=unknown
  if [[ $finished == true ]]; then
    dms_log "run finished at step $step ($summary)"
    return 0
  fi
  if [[ $preempted == true ]]; then
    dms_log "run stopped by a preemption signal at step $step; checkpoint saved"
    dms_requeue
    return
  fi
  dms_die "run stopped at step $step neither finished nor preempted ($summary)"
}
