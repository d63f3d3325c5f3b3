#!/usr/bin/env bash
# GPU check of sequence parallelism (LocalNorm) and recompute through the real trainer, one call on
# 2 GPUs (nvidia-h200-x2; carry .carry only: random model, random tokens):
#
#   bash runbooks/sequence_parallel_check.sh          # 2 GPUs: the layouts below
#   bash runbooks/sequence_parallel_check.sh repeat   # 1 GPU: TP=1 twice, the run-to-run spread of the device
#
# A SmolLM2-shaped Llama with heads divisible by 2 (8 heads, 4 KV heads, hidden 512, 12 layers, SmolLM2's
# vocabulary), random weights; the smollm2_paper recipe (micro-batch 4 x 2048, global batch 8).
# 1. fp32 at lr 2e-5 (where PP=2 followed PP=1, docs/benchmarks.md): TP=1 vs TP=2+SP vs TP=2+SP with
#    full recompute, 12 steps.
# 2. bf16 at the recipe's lr: TP=1 vs TP=2+SP vs TP=2+SP with selective recompute, 12 steps.
# Reports land in $OUT (one archive).
set -euo pipefail
source runbooks/common.sh  # start_runbook
start_runbook sp_check
ARCH=(experiment=smollm2_paper model.hf_config.hidden_size=512 model.hf_config.num_attention_heads=8
    model.hf_config.num_key_value_heads=4 model.hf_config.num_hidden_layers=12 dms.cr_ramp_steps=12
    train.warmup_steps=2)
run() {  # name, layouts, overrides...
    local name=$1 layouts=$2
    shift 2
    # shellcheck disable=SC2086  # the layout list is words on purpose
    python3 benchmarks/layout_parity.py --out "/tmp/sp_$name" --steps 12 --layouts $layouts -- "${ARCH[@]}" "$@" \
        2>&1 | tee "$OUT/$name.log" | grep -v Warning | tail -30
    cp "/tmp/sp_$name/report.json" "$OUT/${name}_report.json"
    for f in /tmp/sp_"$name"/*.log; do cp "$f" "$OUT/${name}_$(basename "$f")"; done
}
case "${1:-sp}" in
sp)  # 2 GPUs
    run fp32 "tp1 tp2sp tp2sp_full" model.dtype=fp32 train.lr=2e-5 train.min_lr=2e-5
    run bf16 "tp1 tp2sp tp2sp_selective"
    ;;
repeat)  # 1 GPU: the same TP=1 run twice, the device's own run-to-run spread
    run fp32_repeat "tp1 tp1_again" model.dtype=fp32 train.lr=2e-5 train.min_lr=2e-5
    run bf16_repeat "tp1 tp1_again"
    ;;
*)
    echo "usage: bash runbooks/sequence_parallel_check.sh [sp | repeat]" >&2
    exit 2
    ;;
esac
