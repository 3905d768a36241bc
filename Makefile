# dualtrack: the two commands a platform engineer needs are `make up` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SAMPLES := docs/samples
CHECKOV_VENV := .venv-checkov
AWS_VENV := .venv-aws
CRD_SCHEMAS := tests/infra/crd_schemas
POLICY_VENV := infra/policy/venv
LLAMA_VENV := .venv-llama
OIDC_VENV := .venv-oidc
MILVUS_SERVER_VENV := .venv-milvus-server
STANDALONE_TESTS := tests/services/kb/test_access.py tests/services/kb/test_migrate.py tests/services/kb/test_hybrid.py tests/services/gateway/test_permissions.py
LLAMA_VERSION := $(shell sed -n 's/^llama-cpp-python\[server\]==//p' requirements-llama.txt)
# llama-cpp-python is sdist-only: its wheel takes minutes to build, so it is built once, portable
# (no -march=native: hosts of the wheelhouse have other CPUs), and cached outside the checkout.
WHEELHOUSE ?= $(HOME)/.cache/dualtrack/wheels
LLAMA_WHEEL := $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_VERSION)-py3-none-linux_x86_64.whl
MODEL ?=
ANSIBLE_RELEASE := 12.3.0
COLLECTIONS := containers/podman community/general ansible/posix
QUESTION ?= How many vacation days do full-time employees get per year?

.PHONY: help up down status test test-standalone lint plan install install-dev clean onprem-host-tools

help:
	@echo "make up      - install, start Milvus Lite + gateway on 127.0.0.1, ingest samples, ask a question"
	@echo "               MODEL=path.gguf: answer with that model (llama.cpp on this machine's cores)"
	@echo "make down    - stop the local stack"
	@echo "make status  - show what runs, its logs and health"
	@echo "make test    - install everything and run lint + the whole test suite"
	@echo "make plan    - offline plan of every Pulumi stack into plans/ (no cloud credentials)"
	@echo "make lint    - ruff + ansible-lint (production profile)"

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

# checkov pins conflict with the Pulumi SDK: it gets a venv of its own.
$(CHECKOV_VENV)/.installed: requirements-checkov.txt
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q -r requirements-checkov.txt
	touch $@

# The pod replay tests: moto's S3 server and the AWS CLI, apart from the Pulumi SDK's pins.
$(AWS_VENV)/.installed: requirements-aws.txt
	$(PYTHON) -m venv $(AWS_VENV)
	$(AWS_VENV)/bin/pip install -q -r requirements-aws.txt
	touch $@

# Test-only CRD schema validators (npm); node/npm come from the machine, or Debian if missing.
$(CRD_SCHEMAS)/node_modules/.installed: $(CRD_SCHEMAS)/package-lock.json
	command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq nodejs npm)
	npm ci --prefix $(CRD_SCHEMAS) --no-audit --no-fund --loglevel=error
	touch $@

# The policy pack runs in its own venv (what `pulumi preview --policy-pack infra/policy`
# creates); the tests evaluate it there too.
$(POLICY_VENV)/.installed: infra/policy/requirements.txt
	$(PYTHON) -m venv $(POLICY_VENV)
	$(POLICY_VENV)/bin/pip install -q -r infra/policy/requirements.txt
	touch $@

$(LLAMA_WHEEL): | $(BIN)/python
	mkdir -p $(WHEELHOUSE)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip wheel -q --no-deps -w $(WHEELHOUSE) llama-cpp-python==$(LLAMA_VERSION)

# The test identity provider (a real OIDC provider process) runs in its own venv.
$(OIDC_VENV)/.installed: requirements-oidc.txt
	$(PYTHON) -m venv $(OIDC_VENV)
	$(OIDC_VENV)/bin/pip install -q -r requirements-oidc.txt
	touch $@

# The llama.cpp server runs in its own venv (its pins are not the gateway's).
$(LLAMA_VENV)/.installed: requirements-llama.txt $(LLAMA_WHEEL)
	$(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/pip install -q --find-links $(WHEELHOUSE) --only-binary llama-cpp-python -r requirements-llama.txt
	touch $@

# Galaxy is unreachable: the collections the playbooks and tests use come out of the pinned
# `ansible` community wheel from PyPI.
ansible/collections/.installed: Makefile | $(BIN)/python
	$(BIN)/pip download -q --no-deps ansible==$(ANSIBLE_RELEASE) -d $(VENV)/wheels
	rm -rf ansible/collections
	$(BIN)/python -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
	  keep = tuple('ansible_collections/' + c + '/' for c in sys.argv[2:]); \
	  z.extractall('ansible/collections', [n for n in z.namelist() if n.startswith(keep)])" \
	  $(VENV)/wheels/ansible-$(ANSIBLE_RELEASE)-py3-none-any.whl $(COLLECTIONS)
	touch $@

# The on-prem tests run a systemd host in podman (root-only: installs Debian packages).
onprem-host-tools:
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq podman runc debootstrap)

install: $(VENV)/.runtime ansible/collections/.installed
install-dev: $(VENV)/.dev $(LLAMA_VENV)/.installed $(OIDC_VENV)/.installed $(CHECKOV_VENV)/.installed $(AWS_VENV)/.installed $(CRD_SCHEMAS)/node_modules/.installed $(POLICY_VENV)/.installed \
	ansible/collections/.installed onprem-host-tools

up: install $(if $(MODEL),$(LLAMA_VENV)/.installed)
	$(BIN)/dualtrack local up $(if $(MODEL),--model "$(MODEL)")
	$(BIN)/dualtrack kb ingest $(SAMPLES) --exclude README.md
	$(BIN)/dualtrack ask "$(QUESTION)"

down:
	@if [ -x $(BIN)/dualtrack ]; then $(BIN)/dualtrack local down; else echo "nothing to stop"; fi

status: install
	$(BIN)/dualtrack local status

plan: install
	$(BIN)/dualtrack plan

lint: install-dev
	$(BIN)/ruff check .
	cd ansible && PATH="$(CURDIR)/$(BIN):$$PATH" ANSIBLE_COLLECTIONS_PATH="$(CURDIR)/ansible/collections" \
	  $(CURDIR)/$(BIN)/ansible-lint --offline -q playbooks/ inventories/ roles/

test: install-dev lint
	$(BIN)/python -m pytest
	$(MAKE) test-standalone

# the access-list, migration and permission tests again, against Milvus standalone
test-standalone: install-dev $(MILVUS_SERVER_VENV)/.installed
	benchmarks/with-standalone.sh $(BIN)/python -m pytest -p no:cacheprovider $(STANDALONE_TESTS)

$(MILVUS_SERVER_VENV)/.installed: requirements-milvus-server.txt
	$(PYTHON) -m venv $(MILVUS_SERVER_VENV)
	$(MILVUS_SERVER_VENV)/bin/pip install -q -r requirements-milvus-server.txt
	touch $@

clean: down
	rm -rf .dualtrack .pytest_cache .ruff_cache
