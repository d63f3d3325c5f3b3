#!/usr/bin/env bash
# Install the packages pinned in LOCKFILE (name==version lines) without their dependencies into DIR, a
# folder that a test run puts first on PYTHONPATH, over the locked .venv: a second, small environment
# (e.g. the oldest supported transformers with its own huggingface-hub and tokenizers; everything else is
# the locked .venv's). Idempotent: a stamp skips the install while LOCKFILE is unchanged.
#   usage: scripts/overlay.sh DIR LOCKFILE
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$1
lock=$2
py=${VENV:-.venv}/bin/python
stamp="$dir/.installed-from"
want=$(sha256sum "$lock" | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "==> $dir is up to date ($lock)"
  exit 0
fi
rm -rf "$dir"
echo "==> installing into $dir: $(grep -v '^#' "$lock" | tr '\n' ' ')"
"$py" -m pip install --quiet --disable-pip-version-check --no-deps --target "$dir" -r "$lock"
echo "$want" > "$stamp"
