PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: setup data demo test lint

# One-time set-up: a virtual environment with torch 2.14.1 (from this machine's disk) and the package.
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[test,heads,docs]"
	touch $@

# Real data: Fashion-MNIST from the Debian package (needs root, as on these machines).
data:
	@test -f $(FMNIST) || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)

# The main job: prune a CNN trained on Fashion-MNIST with the spectral criterion and with magnitude.
demo: setup data
	$(BIN)/qmprune demo

# The whole test suite.
test: setup data
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check torch_qmprune tests examples benchmarks
