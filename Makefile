# dml: make help lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   ?= .venv
PYTHON := $(VENV)/bin/python
DATA   ?=
ARGS   ?=
# Hydra overrides typed as make variables (make train DATA=cub trainer=gpu): the command line's variables
# whose names start in lower case (the Makefile's own and the environment's are upper case) go to the
# script after ARGS, from the make a user typed only (not a nested one). A value with $ or quotes: use ARGS.
UPPER     := A B C D E F G H I J K L M N O P Q R S T U V W X Y Z _
LOWER     := $(filter-out $(addsuffix %,$(UPPER)),$(.VARIABLES))
OVERRIDES := $(if $(filter 0,$(MAKELEVEL)),$(strip $(foreach v,$(LOWER),$(if $(filter command line,$(origin $(v))),'$(v)=$($(v))'))))
# The training setup a benchmark gets from make train (conf/preset/); PRESET= for none.
PRESET ?= $(if $(filter cub cars sop inshop omniglot folder table,$(DATA)),imagenet_finetune)
CKPT   ?=
# faiss-gpu where a GPU answers, faiss-cpu otherwise (never both in one venv).
EXTRAS ?= $(shell nvidia-smi >/dev/null 2>&1 && echo dev,gpu || echo dev,cpu)

export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: help install data train evaluate study test test-all lint typecheck docs gpu-check gpu-bundle format clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'
	@echo "  variables: DATA=<dataset, default mnist> PRESET=<training setup, default imagenet_finetune for image benchmarks>"
	@echo "             ARGS='<hydra overrides>' CKPT=<checkpoint> EXTRAS=$(EXTRAS)"

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed ## Create .venv and install dml with dev tools and faiss (gpu or cpu)

data: $(VENV)/.installed ## Prepare a dataset once and print its splits: make data DATA=cub
	$(PYTHON) prepare.py $(if $(DATA),dataset=$(DATA)) $(ARGS) $(OVERRIDES)

train: $(VENV)/.installed ## Train: make train [DATA=cub] [trainer=gpu] [ARGS="experiment=antico_cub_r50"]
	$(PYTHON) train.py $(if $(DATA),dataset=$(DATA)) $(if $(PRESET),preset=$(PRESET)) $(ARGS) $(OVERRIDES)

evaluate: $(VENV)/.installed ## Evaluate a checkpoint: make evaluate CKPT=logs/train/runs/<run>/checkpoints/last.ckpt
	@test -n "$(CKPT)" || { echo "error: give CKPT=<path to a .ckpt written by make train>"; exit 2; }
	$(PYTHON) evaluate.py ckpt_path=$(CKPT) $(ARGS) $(OVERRIDES)

study: $(VENV)/.installed ## Run the study behind docs/results.md (about 70 min on 2 cores): make study [STUDY=quick|cub_antico|cars_antico] [ARGS=...]
	$(PYTHON) -m dml.study $(if $(STUDY),study=$(STUDY)) $(ARGS) $(OVERRIDES)

test: $(VENV)/.installed ## Run the everyday test tier (< 5 min on 2 cores; slow, notebook and gpu tests left out)
	WANDB_MODE=offline $(PYTHON) -m pytest -q

test-all: $(VENV)/.installed ## Run every test tier (slow and notebooks included; gpu tests skip without a GPU): what CI runs
	WANDB_MODE=offline $(PYTHON) -m pytest -q -m "not gpu or gpu" --nbmake --nbmake-timeout=900

lint: $(VENV)/.installed ## Lint and check formatting with ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.installed ## Type-check src/ with mypy (settings in pyproject.toml)
	$(VENV)/bin/mypy

docs: $(VENV)/.installed ## Regenerate docs/recipes.md from the recipes' headers
	$(PYTHON) docs/build.py

DEVICE ?= cuda
GPU_SITE := .gpu/site
gpu-check: ## The GPU check (about 8 min on a GPU; DEVICE=cpu: toy sizes): writes gpu-check/summary.md
	PYTHONPATH=src:.:$(GPU_SITE) $(if $(wildcard $(PYTHON)),$(PYTHON),python3) -m benchmarks.gpu_check --device $(DEVICE)

gpu-bundle: $(VENV)/.installed ## Copy the pure-Python packages a bare GPU machine lacks (hydra, omegaconf, antlr4) to .gpu/site
	rm -rf $(GPU_SITE) && mkdir -p $(GPU_SITE)
	$(PYTHON) -c "import hydra, omegaconf, antlr4, os; print(*(os.path.dirname(m.__file__) for m in (hydra, omegaconf, antlr4)), sep=chr(10))" \
	  | xargs -I{} cp -r {} $(GPU_SITE)/
	find $(GPU_SITE) -name __pycache__ -prune -exec rm -rf {} +
	@du -sh $(GPU_SITE)

format: $(VENV)/.installed ## Apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean: ## Remove run outputs and caches (keeps .venv)
	rm -rf logs outputs multirun wandb .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
