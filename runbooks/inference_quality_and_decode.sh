#!/usr/bin/env bash
# GPU runs of inference (retrofit, quality vs baselines, decode speed), on one lent H100, in back-to-back calls (the machine keeps its disk
# while warm). Each phase writes what it measured to $OUT.
#
#   bash runbooks/inference_quality_and_decode.sh part1    # carry .carry .carry_model/part00: stash it; GPU tests
#   bash runbooks/inference_quality_and_decode.sh train    # carry .carry .carry_model/part01 assets/shakespeare.txt:
#                                          #   teacher + data; retrofit CR 8 and CR 4 side by side until the
#                                          #   deadline (SIGTERM -> checkpoint, resumable) while the baselines
#                                          #   (teacher, StreamingLLM/TOVA/H2O at CR 4 and 8) are evaluated
#   bash runbooks/inference_quality_and_decode.sh eval     # carry .carry assets/shakespeare.txt: finish + export both; DMS
#                                          #   quality; HF remote-code parity; decode tok/s + KV bytes at 8K
#                                          #   (batch 1, 32); the baselines if the train call did not finish
#   bash runbooks/inference_quality_and_decode.sh bench    # GPU tests + the decode benchmark again
set -euo pipefail
PHASE=${1:?phase: part1 | train | eval | bench}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
START=$(date +%s)
source runbooks/common.sh  # setup, model_and_data, STASH, archive_at_exit
archive_at_exit "$PHASE"

CR8=(experiment=smollm2_paper run_dir=runs/cr8 train.save_interval=100 logging.console=false)
CR4=(experiment=smollm2_paper run_dir=runs/cr4 dms.target_cr=4 dms.cr_ramp_steps=110 train.steps=130
    train.save_interval=100 logging.console=false)

left() { echo $(( $1 - ($(date +%s) - START) )); }

EVAL=(--teacher assets/smollm2-135m-instruct --text assets/shakespeare.txt --ppl-lengths 2048 4096 8192
    --passkey-lengths 2048 4096 7168 --depths 0 0.25 0.5 0.75 1 --vt-length 4096 --vt-trials 3)

baselines() {  # seconds: teacher + StreamingLLM / TOVA / H2O at CR 4 and 8 on the original model
    if [ -f /tmp/baselines_done ]; then cp -r /tmp/eval_baselines "$OUT/"; return 0; fi
    timeout -k 10 "$1" python3 launch/evaluate.py --model assets/smollm2-135m-instruct --out /tmp/eval_baselines \
        "${EVAL[@]}" --policies teacher streaming_llm@4 tova@4 h2o@4 streaming_llm@8 tova@8 h2o@8 \
        > "$OUT/eval_baselines.log" 2>&1 && touch /tmp/baselines_done || echo "baselines: not finished (rc $?)"
    [ -d /tmp/eval_baselines ] && cp -r /tmp/eval_baselines "$OUT/" || true
}

retrofit() {  # name, seconds, overrides...: resumes from the newest checkpoint (train.resume=auto)
    local name=$1 secs=$2
    shift 2
    if grep -qs '"finished": true' "runs/$name/summary.json"; then echo "$name: finished"; return 0; fi
    MASTER_PORT=$((29500 + RANDOM % 1000)) timeout --preserve-status -s TERM -k 90 "$secs" python3 launch/retrofit.py "$@" \
        >> "$OUT/retrofit_$name.log" 2>&1 || echo "$name: stopped (rc $?), will resume"
}

export_run() {  # name
    local ckpt
    ckpt=$(printf '%s\n' "runs/$1"/checkpoints/iter_* | sort | tail -1)
    python3 launch/convert.py export --ckpt "$ckpt" --out "exports/$1" --force --quiet > "$OUT/export_$1.log" 2>&1
    cp "runs/$1"/{metrics.jsonl,summary.json,config.yaml,run_info.json,cr_curve.png} "$OUT/" 2>/dev/null || true
    for f in metrics.jsonl summary.json cr_curve.png; do [ -f "runs/$1/$f" ] && cp "runs/$1/$f" "$OUT/$1_$f"; done
    grep -o '"trained_cr": [0-9.]*' "exports/$1/config.json" || true
}

case "$PHASE" in
part1)
    cp .carry_model/part00 "$STASH/part00"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    export PYTHONPATH=$PWD
    python3 -m pytest -q -p no:cacheprovider tests/gpu/test_paged_decode.py 2>&1 | tee "$OUT/gpu_tests_part1.txt" | tail -5
    for b in 1 32; do
        rows=()
        [ "$b" = 1 ] && rows=(--baseline-rows 30)
        python3 benchmarks/profile_decode.py --context 8192 --batch "$b" --steps 20 --no-profile \
            "${rows[@]}" 2>&1 | grep -E "step" | tee -a "$OUT/probe.txt"
    done
    ;;
train)
    setup
    model_and_data > "$OUT/setup.log" 2>&1 || { tail -40 "$OUT/setup.log"; exit 1; }
    tail -2 "$OUT/setup.log"
    DEADLINE=555
    retrofit cr8 "$(left $DEADLINE)" "${CR8[@]}" &
    # the second run starts once the first has built the dataset index (no race on the cache)
    until [ -f runs/cr8/metrics.jsonl ] || [ "$(left 400)" -le 0 ]; do sleep 5; done
    retrofit cr4 "$(left $DEADLINE)" "${CR4[@]}" &
    # the training-free baselines need only the original model: evaluated meanwhile on the same GPU
    baselines "$(left $DEADLINE)" &
    wait
    for n in cr8 cr4; do echo "$n: $(wc -l < runs/$n/metrics.jsonl) steps logged"; done
    ;;
eval)
    setup
    retrofit cr4 "$(left 300)" "${CR4[@]}" &
    retrofit cr8 "$(left 300)" "${CR8[@]}" &
    wait
    for n in cr8 cr4; do grep -qs '"finished": true' "runs/$n/summary.json" || { echo "$n did not finish"; exit 1; }; done
    export_run cr8
    export_run cr4
    python3 launch/evaluate.py --model exports/cr8 --out "$OUT/eval_cr8" "${EVAL[@]}" --policies teacher dms \
        > "$OUT/eval_cr8.log" 2>&1 || { tail -30 "$OUT/eval_cr8.log"; exit 1; }
    python3 launch/evaluate.py --model exports/cr4 --out "$OUT/eval_cr4" --policies dms "${EVAL[@]}" \
        > "$OUT/eval_cr4.log" 2>&1 || { tail -30 "$OUT/eval_cr4.log"; exit 1; }
    grep -A4 "passkey\|perplexity_8192" "$OUT/eval_cr8.log" | head -40
    python3 benchmarks/hf_parity.py --model exports/cr8 --text assets/shakespeare.txt --out "$OUT/hf_parity.json" \
        2>&1 | grep prompt_tokens || true
    timeout "$(left 560)" python3 benchmarks/decode_bench.py --model exports/cr8 --text assets/shakespeare.txt \
        --context 8192 --batch 1 32 --new-tokens 64 --out "$OUT/decode_bench.json" > "$OUT/decode_bench.log" 2>&1 || true
    cut -c1-600 "$OUT/decode_bench.log" | tail -4
    baselines "$(left 590)"
    echo "eval done in $(( $(date +%s) - START )) s"
    ;;
bench)
    setup
    python3 benchmarks/decode_bench.py --model exports/cr8 --text assets/shakespeare.txt --context 8192 \
        --batch 1 32 --new-tokens 64 --out "$OUT/decode_bench.json" 2>&1 | tee "$OUT/decode_bench.log"
    python3 benchmarks/hf_parity.py --model exports/cr8 --text assets/shakespeare.txt --out "$OUT/hf_parity.json" \
        2>&1 | tail -5
    python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.txt" | tail -5
    ;;
*)
    echo "unknown phase $PHASE" >&2
    exit 2
    ;;
esac
