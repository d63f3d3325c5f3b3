#!/usr/bin/env bash
#SBATCH --job-name=dms-r1-qwen-32b
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
#SBATCH --open-mode=append
#SBATCH --signal=USR1@600
#SBATCH --requeue
#
# The paper-scale retrofit: DeepSeek-R1-Distill-Qwen-32B to CR 8 (experiment=r1_qwen_32b_cr8: TP=8 inside a
# node, PP=2 across nodes, 8K sequences, global batch 256, 1000 steps). 32 nodes x 8 H100 = 256 GPUs,
# DP=16; another node count with `sbatch --nodes=N` (N x 8 must be a multiple of 16, and 256 a multiple of
# the resulting DP). One srun task per GPU; 10 minutes before the time limit every task gets SIGUSR1,
# saves a checkpoint and stops, and the job requeues itself and resumes (slurm/README.md).
#
#   mkdir -p logs   # (exists in the repository) Slurm does not create the --output folder
#   sbatch slurm/retrofit_32b.sh                                   # from the repository root
#   sbatch --nodes=16 -A ACCOUNT -p PARTITION slurm/retrofit_32b.sh dms.target_cr=4 train.steps=800
#   DRY_RUN=1 bash slurm/retrofit_32b.sh dms.target_cr=4           # print the command and config only
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

DMS_DEFAULT_NODES=32  # = --nodes above; used for DRY_RUN outside an allocation (NODES=... overrides)
dms_main experiment=r1_qwen_32b_cr8 -- "$@"
