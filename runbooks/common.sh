# shellcheck shell=bash
# Shared by the GPU scripts (sourced): wheels into /tmp/site, then the SmolLM2 teacher (HF folder and
# Megatron checkpoint) and the stdlib training text, built on the machine from the carried GGUF pieces.
# STASH: where the first GGUF half waits between the two calls.
STASH=${STASH:-/tmp/dms_stash}
mkdir -p "$STASH"

setup() {  # the wheels come from .carry, or from the stash an earlier call of this machine filled
    local wheels=.carry
    if [ -d .carry ]; then
        mkdir -p "$STASH/carry" && cp .carry/* "$STASH/carry/"
    else
        wheels=$STASH/carry
    fi
    python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$wheels"/*.whl
    tar -xzf "$wheels/antlr4_pkg.tar.gz" -C /tmp/site
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
}

model_and_data() {
    if [ -f checkpoints/smollm2_135m/dms_megatron.json ] && [ -f data/stdlib.json ]; then
        echo "model and data already prepared"
        return
    fi
    # the GGUF's pieces (.carry_model/partNN, split by size) arrive over several calls: stash, then join
    cp .carry_model/part* "$STASH"/ 2>/dev/null || true
    cat "$STASH"/part* > "$STASH/SmolLM2-135M-Instruct.Q4_1.gguf"
    python3 scripts/fetch_smollm2.py --gguf "$STASH/SmolLM2-135M-Instruct.Q4_1.gguf"
    python3 launch/convert.py import --hf assets/smollm2-135m-instruct --out checkpoints/smollm2_135m --quiet
    # training text: this machine's Python standard library (about 3M tokens)
    LIB=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    INPUTS=("$LIB"/*.py)
    for d in email json asyncio logging concurrent xml importlib; do [ -d "$LIB/$d" ] && INPUTS+=("$LIB/$d"); done
    python3 launch/preprocess.py --quiet --tokenizer assets/smollm2-135m-instruct --output-prefix data/stdlib \
        --input "${INPUTS[@]}"
}


# The device tool brings back at most 8 files: at exit, everything under $OUT goes into one archive.
pack_out() {
    (cd "$OUT" && find . -type f ! -name "$ARCHIVE" | tar -czf "$ARCHIVE" -T - \
        && find . -mindepth 1 ! -name "$ARCHIVE" -delete) || true
}
archive_at_exit() {  # archive name without .tar.gz
    ARCHIVE="$1.tar.gz"
    trap pack_out EXIT
}

record_gpu() {  # the GPU model, memory, driver and the UTC date into $OUT/gpu.txt
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
    date -u +%FT%TZ >> "$OUT/gpu.txt"
}

start_runbook() {  # archive name: $OUT (default /tmp/gpu_out), one archive at exit, wheels, GPU record
    OUT=${OUT:-/tmp/gpu_out}
    mkdir -p "$OUT"
    archive_at_exit "$1"
    setup
    record_gpu
}
