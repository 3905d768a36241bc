# dualtrack: the two commands a platform engineer needs are `make up` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SAMPLES := docs/samples
QUESTION ?= How many vacation days do full-time employees get per year?

.PHONY: help up down status test lint install install-dev clean

help:
	@echo "make up      - install, start Milvus Lite + gateway on 127.0.0.1, ingest samples, ask a question"
	@echo "make down    - stop the local stack"
	@echo "make status  - show what runs, its logs and health"
	@echo "make test    - install everything and run lint + the whole test suite"
	@echo "make lint    - ruff"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

up: install
	$(BIN)/dualtrack local up
	$(BIN)/dualtrack kb ingest $(SAMPLES) --exclude README.md
	$(BIN)/dualtrack ask "$(QUESTION)"

down:
	@if [ -x $(BIN)/dualtrack ]; then $(BIN)/dualtrack local down; else echo "nothing to stop"; fi

status: install
	$(BIN)/dualtrack local status

lint: install-dev
	$(BIN)/ruff check .

test: install-dev lint
	$(BIN)/python -m pytest

clean: down
	rm -rf .dualtrack .pytest_cache .ruff_cache
