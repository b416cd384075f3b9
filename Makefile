# Two commands on a fresh machine (README "Quick start"):
#   make run    set up .venv, build the sample dataset offline, pretrain the tiny model through both stages
#   make test   set up .venv (+ headless Chromium for the report test), run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run build train test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and alone: the CPU build on this machine's disk, before anything can pull a CUDA one
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[train,test]"
	touch $@

build: setup
	$(PY) -m pipeline.build_shards --aoi europe

# DeepSpeed on a machine without a GPU: the CPU accelerator (gloo); with nvidia-smi, CUDA.
train: setup
	@if command -v nvidia-smi >/dev/null 2>&1; then acc=; else acc=DS_ACCELERATOR=cpu; fi; \
	env $$acc PATH=$(CURDIR)/$(VENV)/bin:$$PATH deepspeed training/pretrain.py

run: build train

test: setup
	bash scripts/install_chromium.sh
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

bench: setup
	$(PY) -m benchmarks.run_all

clean:
	rm -rf datasets runs
