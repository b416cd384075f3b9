# Two commands on a fresh machine (README "Quick start"):
#   make run    set up .venv, build the sample dataset offline, pretrain the tiny model through both stages
#   make test   set up .venv (+ headless Chromium for the report test), run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run build train test test-fast bench bench-torchgeo clean

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

# The issue's reference reader, TorchGeo, in its own environment (never a project dependency):
# torchvision pinned to the release that matches torch 2.13, else pip pulls a newer CUDA torch.
TG_VENV := .venv-torchgeo
$(TG_VENV)/.installed:
	python3 -m venv $(TG_VENV)
	$(TG_VENV)/bin/pip install -q torch==2.13.0
	$(TG_VENV)/bin/pip install -q torchgeo==0.8.1 torch==2.13.0 torchvision==0.28.0 requests
	touch $@

bench-torchgeo: setup $(TG_VENV)/.installed
	$(PY) -m benchmarks.run_all --torchgeo-python $(TG_VENV)/bin/python

clean:
	rm -rf datasets runs
