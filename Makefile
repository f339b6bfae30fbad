# One virtual environment at .venv, pinned versions from requirements/lock.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch is what installs on CPU-only machines; GPU users may override TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# verl's pins can clash with the core's: its adapter is tested in an environment of its own.
VERL_VENV := .venv-verl
VERL_STAMP := $(VERL_VENV)/.installed

.PHONY: setup demo toy test test-verl test-slow test-gpu lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -c requirements/lock.txt -e ".[dev,math,data,trl,lora]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/flowrl demo --compare

toy: $(STAMP)
	$(BIN)/flowrl toy --plot outputs/toy.png

# The default tier: in-process tests, at or under a minute on an idle 2-core machine. CI adds test-slow
# (subprocess and multi-process tests, longer end-to-end runs) and test-verl.
test: $(STAMP)
	$(BIN)/python -m pytest

$(VERL_STAMP): pyproject.toml requirements/verl.txt
	$(PYTHON) -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/pip install --quiet --upgrade pip
	$(VERL_VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(VERL_VENV)/bin/pip install --quiet -c requirements/verl.txt -e ".[dev,math,verl]"
	$(VERL_VENV)/bin/python -c "import flowrl.integrations.verl"
	touch $(VERL_STAMP)

test-verl: $(VERL_STAMP)
	$(VERL_VENV)/bin/python -m pytest tests/integrations/test_verl.py

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# On a CUDA machine (vLLM tests also need `pip install -e ".[vllm]"`); skipped where neither exists.
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu -rs

# A CUDA machine: its own environment (.venv-gpu), pinned by requirements/gpu.txt to versions that
# accept each other: torch 2.13.0 (PyPI's CUDA build), vLLM 0.31.0, transformers 5.17.0, TRL 1.16.0,
# peft 0.21.2 (the main lock's transformers 5.24 is too new for vLLM). CPython 3.11 or 3.12, Linux x86_64.
GPU_VENV := .venv-gpu
GPU_STAMP := $(GPU_VENV)/.installed
.PHONY: setup-gpu test-gpu-env check-gpu-lock

setup-gpu: $(GPU_STAMP)

$(GPU_STAMP): pyproject.toml requirements/gpu.txt
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install --quiet --upgrade pip
	$(GPU_VENV)/bin/pip install -c requirements/gpu.txt -e ".[math,data,trl,lora,vllm,dev]"
	touch $(GPU_STAMP)

test-gpu-env: $(GPU_STAMP)
	$(GPU_VENV)/bin/python -m pytest -m gpu -rs

# pip's resolver, dry run, on requirements/gpu.txt for a Linux CUDA host: reads metadata, downloads no
# CUDA wheel (about a minute per Python version; needs PyPI). Part of the slow tier (make test-slow).
check-gpu-lock: $(STAMP)
	$(BIN)/python -m pytest -m slow tests/integrations/test_gpu_env.py -s

lint: $(STAMP)
	$(BIN)/ruff check flowrl tests benchmarks
	$(BIN)/ruff format --check flowrl tests benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix flowrl tests benchmarks
	$(BIN)/ruff format flowrl tests benchmarks

clean:
	rm -rf $(VENV) $(VERL_VENV) outputs runs
