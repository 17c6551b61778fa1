# Two commands for a fresh machine (see README): `make run` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist
# pip's config on some machines lists local indexes that do not exist for every package: quiet that noise.
PIP_QUIET := grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: install data run test test-all bench clean-outputs
install: $(VENV)/.installed data

$(VENV)/.installed: requirements.lock pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock 2>&1 | ($(PIP_QUIET))
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | ($(PIP_QUIET))
	$(BIN)/python -c "import torch, ray, mlflow, dvc, robust_transfer"
	touch $@

# Debian's Fashion-MNIST package when apt is there; otherwise the prepare stage downloads it.
data:
	@if [ ! -d $(FMNIST) ] && command -v apt-get >/dev/null; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  ($$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null) || \
	  echo "note: could not install dataset-fashion-mnist; the prepare stage will try torchvision's download"; \
	fi

run: install
	PATH=$(abspath $(BIN)):$$PATH dvc repro

# The CI suite (about 12 minutes on 2 cores: the smoke pipeline end to end, beside the unit tests).
test: install
	PATH=$(abspath $(BIN)):$$PATH python -m pytest -q -m "not slow"

# Everything, also the tests marked slow (the CIFAR pipeline on the CPU, a two-node Ray cluster,
# a pretrain stage killed and resumed): tens of minutes more.
test-all: install
	PATH=$(abspath $(BIN)):$$PATH python -m pytest -q

bench: install
	PATH=$(abspath $(BIN)):$$PATH python -m benchmarks --quick
