#!/usr/bin/env bash
# GPU check of the planner's per-layer memory, one call on one H100 (carry .carry only; no
# model or data needed: random weights, random tokens):
#
#   bash runbooks/planner_layer_memory.sh
#
# 1. R1-Distill-Qwen-32B, one rank's shapes of TP=8 (5 of 40 heads, 1 of 8 KV heads, FFN 3456), 8K
#    tokens, no SP, flex attention, bf16: 4 vs 8 layers -> saved bytes per layer (all regions) and the
#    growth per layer of the allocator (static: before the step; transient: peak minus that), against
#    the planner (docs/cluster.md: 1.098 GiB of activations per layer and micro-batch without SP);
#    again with parallel.recompute=full and =selective (allocator growth only). Each depth runs in its
#    own process.
# 2. SmolLM2-135M at its own shapes (full vocabulary), 15 vs 30 layers.
# Reports land in $OUT/*.json (one archive).
set -euo pipefail
source runbooks/common.sh  # start_runbook
start_runbook planner_layer_memory
for rc in none full selective; do
    python3 benchmarks/activation_check.py --out "$OUT/r1_qwen_32b_tp8_rank_$rc.json" --work /tmp/ac32_$rc \
        --layers 4 8 --emulate-tp 8 experiment=r1_qwen_32b_cr8 parallel.recompute=$rc 2>&1 \
        | tee "$OUT/r1_qwen_32b_tp8_rank_$rc.log" | tail -40
done
python3 benchmarks/activation_check.py --out "$OUT/smollm2.json" --work /tmp/acsm \
    --layers 15 30 --vocab 0 experiment=smollm2_paper 2>&1 | tee "$OUT/smollm2.log" | tail -40
