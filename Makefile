# One-command set-up: `make demo` and `make test` work on a machine with only Python, apt and pip.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# setup: the package + onnxruntime, what `run` (so the demo) uses; setup-dev adds the dev extra for the
# tests (pytest, ruff, triton, ray: ~1.3 GB installed, a minute of the demo's set-up it does not need).
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
TORCH_VERSION ?= 2.13.0
DEMO_OUT ?= runs/demo
FMNIST_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup setup-dev data demo test lint format clean

setup: $(STAMP)
setup-dev: $(DEV_STAMP)

# torch first, pinned: its CPU wheel is what everything else then resolves against (an unpinned torch
# would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[export]'
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PIP) install -q -e '.[dev]'
	touch $(DEV_STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist, where apt is available (the digits fallback needs nothing).
data:
	@if [ -d $(FMNIST_DIR) ]; then echo "Fashion-MNIST: $(FMNIST_DIR)"; \
	elif command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -q >/dev/null 2>&1 && $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) || \
	  echo "warning: could not install dataset-fashion-mnist; tests that need it are skipped"; \
	else echo "warning: no apt-get; set TCKR_FASHION_MNIST_DIR to a folder of Fashion-MNIST IDX files"; fi

# The whole pipeline at CPU scale (caption -> teacher -> generate -> GKD student -> LiRA -> report), ~10 min on
# 2 cores; prints the report's path and its headline table. A rerun skips the stages that are up to date.
demo: setup data
	$(VENV)/bin/tckr-engine run configs/fashion-mnist-cpu.toml --out $(DEMO_OUT)

test: setup-dev data lint
	$(PY) -m pytest -q

lint: setup-dev
	$(VENV)/bin/ruff check tckr_engine tests
	$(VENV)/bin/ruff format --check tckr_engine tests

format: setup-dev
	$(VENV)/bin/ruff check --fix tckr_engine tests
	$(VENV)/bin/ruff format tckr_engine tests

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
