# ILR recipe repository. `make test` sets everything up on a fresh machine, then runs the offline suite.
.DEFAULT_GOAL := help
.PHONY: help install test test-slow quality style clean evaluate

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and on its own: a plain `torch` requirement resolved by pip would pull a
# multi-GB CUDA build on CPU machines. Override on GPU clusters, e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
PYTEST_ARGS ?=

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The stamp makes set-up idempotent: it is rebuilt only when the dependency declaration changes.
$(STAMP): setup.cfg pyproject.toml setup.py | $(PY)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)  ## create .venv and install ilr with EXTRAS (default: dev)

test: $(STAMP)  ## run the offline CPU test suite (sets the environment up first)
	$(OFFLINE) $(PY) -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)  ## run the slow tests too (real small model, long fault loops)
	$(OFFLINE) $(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

# MODEL: Hub id or local folder; BENCHMARKS: comma list (math_avg = the paper's five); ARGS: any other `ilr evaluate` flags.
BENCHMARKS ?= math_avg
evaluate: $(STAMP)  ## evaluate a model alone: make evaluate MODEL=org/name BENCHMARKS=gsm8k,math500 [ARGS=...]
	@test -n "$(MODEL)" || { echo "Set MODEL, e.g. make evaluate MODEL=org/name BENCHMARKS=gsm8k,math500"; exit 2; }
	$(VENV)/bin/ilr evaluate --model $(MODEL) --benchmarks $(BENCHMARKS) $(ARGS)

quality: $(STAMP)  ## lint and format check
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

style: $(STAMP)  ## format and auto-fix
	$(VENV)/bin/ruff check --fix src tests
	$(VENV)/bin/ruff format src tests

clean:  ## remove the environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache build src/*.egg-info
