# Two commands on a fresh machine (README "Quick start"):
#   make run    set up .venv, build the sample dataset offline, pretrain the tiny model through both stages
#   make test   set up .venv (+ headless Chromium for the report test), run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run build train test test-fast lock check-lock check-lowest bench bench-torchgeo mutants clean

setup: $(VENV)/.installed

# Exact pins from the lock (reproducible), then the project itself without resolving again;
# pip check fails when the lock and pyproject.toml's ranges disagree.
$(VENV)/.installed: pyproject.toml requirements/dev.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/dev.lock
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	touch $@

build: setup
	$(PY) -m pipeline.build_shards --aoi europe

# DeepSpeed on a machine without a GPU: the CPU accelerator (gloo); with nvidia-smi, CUDA.
train: setup
	@if command -v nvidia-smi >/dev/null 2>&1; then acc=; else acc=DS_ACCELERATOR=cpu; fi; \
	env $$acc PATH=$(CURDIR)/$(VENV)/bin:$$PATH deepspeed training/pretrain.py

run: build train

# The lock check first (seconds), then everything, the installed-product test included.
test: setup
	$(PY) scripts/lock.py --check
	bash scripts/install_chromium.sh
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

# Re-resolve requirements/*.lock from pyproject.toml (keeps current pins; --upgrade for newest).
lock: setup
	$(PY) scripts/lock.py

check-lock: setup
	$(PY) scripts/lock.py --check

# The wheel with every core dependency at its declared lower bound (PyPI), checked against the
# checkout's sample dataset (scripts/check_lowest.sh).
check-lowest: setup
	bash scripts/check_lowest.sh

bench: setup
	$(PY) -m benchmarks.run_all

# Mutation testing of the core modules (tests/MUTATION.md); MODULES="pipeline/names.py ..." for
# some of them. mutmut is a developer tool installed here, pinned in scripts/mutants.py.
mutants: setup
	$(PY) -m pip install -q mutmut==3.8.1
	$(PY) scripts/mutants.py $(MODULES)

# The issue's reference reader, TorchGeo, in its own environment (never a project dependency).
# torch 2.14.1 with torchvision 0.29.1: PyPI's torchvision does not import next to torch 2.13's
# CPU build ('operator torchvision::nms does not exist'); this pair imports and runs TorchGeo 0.8.1.
TG_VENV := .venv-torchgeo
$(TG_VENV)/.installed:
	python3 -m venv $(TG_VENV)
	$(TG_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(TG_VENV)/bin/pip install -q torchgeo==0.8.1 torch==2.14.1 torchvision==0.29.1 requests
	$(TG_VENV)/bin/python -c "import torchgeo.datasets, torchvision.ops"
	touch $@

bench-torchgeo: setup $(TG_VENV)/.installed
	$(PY) -m benchmarks.run_all --torchgeo-python $(TG_VENV)/bin/python

clean:
	rm -rf datasets runs
