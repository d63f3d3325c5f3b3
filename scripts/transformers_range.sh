#!/usr/bin/env bash
# Run the exported remote code's tests (tests/unit/test_hf_remote_code.py) under several transformers
# releases, each installed with its own dependencies into .venv-transformers-VERSION/ and layered over
# the locked .venv (PYTHONPATH), as make test-transformers-oldest does for the oldest one. A release whose
# dependencies the index cannot satisfy is installed without them (noted in the log), with
# USE_HUB_KERNELS=0 (transformers >= 5.25 loads hub kernels by default through its `kernels` dependency).
#   usage: scripts/transformers_range.sh OUTDIR VERSION [VERSION ...]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=$1
shift
mkdir -p "$out"
py=${VENV:-.venv}/bin/python
summary="$out/summary.txt"
: > "$summary"
for v in "$@"; do
  dir=.venv-transformers-$v
  log="$out/transformers-$v.log"
  : > "$log"
  if [ ! -f "$dir/.installed-how" ]; then
    rm -rf "$dir"
    how="with its dependencies"
    if ! "$py" -m pip install --quiet --disable-pip-version-check --target "$dir" "transformers==$v" >> "$log" 2>&1; then
      rm -rf "$dir"
      how="WITHOUT its dependencies (the index cannot satisfy them; see the pip error above)"
      "$py" -m pip install --quiet --disable-pip-version-check --no-deps --target "$dir" "transformers==$v" >> "$log" 2>&1
    fi
    echo "$how" > "$dir/.installed-how"
  fi
  how=$(cat "$dir/.installed-how")
  echo "== transformers $v installed $how into $dir" >> "$log"
  USE_HUB_KERNELS=0 PYTHONPATH=$dir "$py" -m pytest tests/unit/test_hf_remote_code.py -p no:cacheprovider >> "$log" 2>&1
  rc=$?
  echo "transformers $v ($how): $(tail -n 1 "$log" | tr -d '=') rc=$rc" | tee -a "$summary"
done
