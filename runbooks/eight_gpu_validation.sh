#!/usr/bin/env bash
# The 32B-shaped retrofit at the layouts of one 8-GPU node, through the real trainer (launch/retrofit.py
# under torchrun, via benchmarks/layout_parity.py): carry .carry only (random model, random tokens).
#
#   bash runbooks/eight_gpu_validation.sh eight   # 8 GPUs (nvidia-h200-x8 / h100-x8): TP=8+SP twice (the
#                                                 #   device's own run-to-run spread), then TP=4+SP x PP=2
#   bash runbooks/eight_gpu_validation.sh four    # 4 GPUs: TP=2+SP x PP=2 twice
#   bash runbooks/eight_gpu_validation.sh one     # 1 GPU: TP=1 twice, 2 layers (the 8-layer model does
#                                                 #   not fit one GPU)
#
# Model: R1-Distill-Qwen-32B layer shapes (hidden 5120, 40 / 8 heads, FFN 27648, vocabulary 152064) with
# LAYERS layers (default 8), random weights written as a Hugging Face folder and imported with
# launch/convert.py; the r1_qwen_32b_cr8 preset (8K sequences, its recipe), STEPS steps (default 12) of
# GBS sequences (default 8; micro-batch 1), the CR ramp cut to the run. Each layout's report: KD,
# compression loss, decision rate and grad norm per step and their largest relative difference to the
# first layout; median step time, tokens/s, model TFLOP/s per GPU; peak memory (rank 0's and the largest of any rank). Beside
# it, launch/plan.py's prediction for the same layout (plan_<layout>.json). Results: $OUT (one archive).
#
# Time: the first call builds the random model on the CPU (8 layers: ~5.5B parameters, ~22 GB in fp32 on
# disk, then the import; not yet timed) inside RUN_SECONDS (default 540); a cut call leaves the imported
# checkpoint in /tmp/eight_<phase>, which the next call on the same warm machine reuses.
#
# Then each layout's retrofit step against a vanilla Megatron step of the same model on the same batches
# (benchmarks/step_throughput.py under torchrun; STEP_SECONDS each): step time, tokens/s, TFLOP/s per GPU.
#
# After the layouts, the last layout again as a Slurm job: `sbatch slurm/retrofit_32b.sh` through the test
# stand-ins (tests/integration/slurm_standin.py; one node, one task per GPU), SIGUSR1 to the job after
# half the steps, requeue, resume; the report's slurm_preemption has where it stopped and resumed and the
# per-step difference to the uninterrupted run (PREEMPT=0 skips it; the one phase skips it unless
# PREEMPT=1: two ~33-GB checkpoints at once fill a 64-GB disk). Every log is searched for NCCL /
# torch.distributed guessing a rank's GPU (nccl_device_guess_warnings: should be empty). Each layout's
# checkpoints are deleted after its run (8 layers: ~80 GB each with the Adam state; the disk is 235 GB).
set -euo pipefail
source runbooks/common.sh  # start_runbook
start_runbook eight_gpu
PHASE=${1:?eight | four | one}
LAYERS=${LAYERS:-$([ "$PHASE" = one ] && echo 2 || echo 8)}
MODEL=(experiment=r1_qwen_32b_cr8 "model.hf_config.num_hidden_layers=$LAYERS" data.seq_length=8192
    parallel.micro_batch_size=1 "parallel.global_batch_size=${GBS:-8}" train.warmup_steps=2
    logging.heatmap_interval=1000)
plan() {  # layout name, tp, pp: the planner's per-GPU memory and step time for it
    python3 launch/plan.py --json --warn-only "${MODEL[@]}" "parallel.tp=$2" "parallel.pp=$3" \
        "parallel.sequence_parallel=$([ "$2" -gt 1 ] && echo true || echo false)" \
        > "$OUT/plan_$1.json" 2> "$OUT/plan_$1.log" || tail -5 "$OUT/plan_$1.log"
}
steps() {  # name, processes, tp, pp: the retrofit step vs a vanilla step of the same model, same batches,
    # one torchrun (benchmarks/step_throughput.py), on the model and data the layout_parity run built
    local work=/tmp/eight_$1 sp
    sp=$([ "$3" -gt 1 ] && echo true || echo false)
    [ -f "$work/megatron/dms_megatron.json" ] || { echo "steps $1: no model in $work (run first)"; return 0; }
    timeout -k 10 "${STEP_SECONDS:-240}" python3 -m torch.distributed.run --standalone --nproc-per-node="$2" \
        benchmarks/step_throughput.py --out "$OUT/steps_$1_tp$3_pp$4.json" --warmup 2 --measure 5 \
        "${MODEL[@]}" "model.checkpoint=$work/megatron" "data.prefixes=[$work/data/random]" data.weights=null \
        "parallel.tp=$3" "parallel.pp=$4" "parallel.sequence_parallel=$sp" train.steps=20 dms.cr_ramp_steps=10 \
        "run_dir=/tmp/eight_steps_$1" logging.wandb_project=null > "$OUT/steps_$1_tp$3_pp$4.log" 2>&1 || true
    tail -6 "$OUT/steps_$1_tp$3_pp$4.log"
}
run() {  # name, layouts, the layout then preempted through Slurm (PREEMPT=0: none): one layout_parity run
    local name=$1 layouts=$2 preempt=()
    [ "${PREEMPT:-1}" = 0 ] || preempt=(--slurm-preempt "$3")
    # shellcheck disable=SC2086  # the layout list is words on purpose
    timeout -k 10 "${RUN_SECONDS:-540}" python3 benchmarks/layout_parity.py --out "/tmp/eight_$name" \
        --steps "${STEPS:-12}" --layouts $layouts "${preempt[@]}" -- "${MODEL[@]}" 2>&1 | tee "$OUT/$name.log" \
        | tail -40 || true
    cp "/tmp/eight_$name/report.json" "$OUT/${name}_report.json" 2>/dev/null || true
    for f in /tmp/eight_"$name"/*.log; do cp "$f" "$OUT/${name}_$(basename "$f")"; done
}
case "$PHASE" in
eight)
    plan tp8sp 8 1
    plan tp4sp_pp2 4 2
    run eight "tp8sp tp8sp_again tp4sp_pp2" tp4sp_pp2
    steps eight 8 8 1
    steps eight 8 4 2
    ;;
four)
    plan tp2sp_pp2 2 2
    run four "tp2sp_pp2 tp2sp_pp2_again" tp2sp_pp2
    steps four 4 2 2
    ;;
one)
    plan tp1 1 1
    PREEMPT=${PREEMPT:-0} run one "tp1 tp1_again" tp1
    steps one 1 1 1
    ;;
*)
    echo "usage: bash runbooks/eight_gpu_validation.sh eight | four | one" >&2
    exit 2
    ;;
esac
