# supmae: `make serve` runs the bundled model on the CPU (REST API + Gradio demo);
# `make test` runs the test suite. Both create/refresh the virtual environment first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

# The torch/torchvision pair that installs from these machines' disk (see docs/development.md).
ARCH := $(shell uname -m)
ifeq ($(ARCH),x86_64)
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
else
TORCH_PINS ?= torch==2.9.1 torchvision==0.24.1
endif
EXTRAS ?= demo,train,dev

.PHONY: venv serve test lint format clean

$(VENV)/.stamp: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e '.[$(EXTRAS)]' $(TORCH_PINS)
	touch $@

venv: $(VENV)/.stamp

serve: venv
	$(VENV)/bin/supmae-serve --host $(HOST) --port $(PORT)

lint: venv
	$(VENV)/bin/ruff check supmae_serve training export app tests benchmarks

format: venv
	$(VENV)/bin/ruff format supmae_serve training export app tests benchmarks
	$(VENV)/bin/ruff check --fix supmae_serve training export app tests benchmarks

test: venv lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
