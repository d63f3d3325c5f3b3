#!/usr/bin/env bash
#SBATCH --job-name=dms-qwen3-8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=08:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
#SBATCH --open-mode=append
#SBATCH --signal=USR1@600
#SBATCH --requeue
#
# One node: Qwen3-8B to CR 8 (experiment=qwen3_8b_cr8: TP=8, 8K sequences, global batch 64, 1000 steps;
# the preset is not yet run on GPUs). Any other preset or model with overrides, e.g.
# `experiment=smollm2_cr8` or `model=llama3_8b model.checkpoint=checkpoints/llama3_8b data.prefixes=[...]`.
# 10 minutes before the time limit every task gets SIGUSR1, saves a checkpoint and stops, and the job
# requeues itself and resumes (slurm/README.md).
#
#   sbatch slurm/retrofit_8b.sh                                     # from the repository root
#   sbatch slurm/retrofit_8b.sh dms.target_cr=4 parallel.tp=4       # TP=4 x DP=2
#   DRY_RUN=1 bash slurm/retrofit_8b.sh                             # print the command and config only
#
# Environment: VENV or CONTAINER_IMAGE (+ CONTAINER_MOUNTS), WANDB_*, NCCL_*, GPUS_PER_NODE, SRUN_ARGS,
# REQUEUE, MAX_REQUEUES, DMS_ROOT (see slurm/README.md). Arguments: Hydra overrides, applied last.
set -euo pipefail

# Slurm runs a copy of this file from its spool folder: find the repository via DMS_ROOT, this file's
# folder (a direct `bash slurm/...` run) or the submit folder.
if [[ -z ${DMS_ROOT:-} ]]; then
  for _dir in "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-}"; do
    if [[ -n $_dir && -f $_dir/slurm/common.sh && -f $_dir/launch/retrofit.py ]]; then
      DMS_ROOT=$(cd "$_dir" && pwd)
      break
    fi
  done
fi
[[ -n ${DMS_ROOT:-} ]] || { echo "cannot find the repository: submit from its root or set DMS_ROOT" >&2; exit 1; }
# shellcheck source=slurm/common.sh
source "$DMS_ROOT/slurm/common.sh"

DMS_DEFAULT_NODES=1  # = --nodes above; used for DRY_RUN outside an allocation (NODES=... overrides)
dms_main experiment=qwen3_8b_cr8 -- "$@"
