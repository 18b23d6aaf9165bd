# Two commands do all set-up on a fresh machine (Python 3.11 + make):
#   make repro   # create .venv from uv.lock, run the whole DVC pipeline
#   make test    # create .venv from uv.lock, run the test suite (slow tests included)
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.9
VENV := .venv
UV := .uv/bin/uv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export UV_PROJECT_ENVIRONMENT := $(VENV)
export TF_CPP_MIN_LOG_LEVEL ?= 2
PRESET ?= default

.PHONY: setup repro test lint exp report lock clean

setup: $(VENV)/.synced

$(UV):
	$(PYTHON) -m venv .uv
	.uv/bin/pip install --quiet "uv==$(UV_VERSION)"

# Pinned: everything comes from uv.lock; `--frozen` refuses to re-resolve.
$(VENV)/.synced: uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen --all-extras --group dev --python $(PYTHON)
	touch $@

repro: setup
	dvc repro

test: setup
	ruff check .
	ruff format --check .
	pytest

lint: setup
	ruff check . && ruff format --check .

lock: $(UV)
	$(UV) lock

clean:
	rm -rf $(VENV) .uv .pytest_cache .ruff_cache
