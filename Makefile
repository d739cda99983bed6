# The ways in: `make run` starts a node on :8080, `make test` runs the suite,
# `make bench` the benchmarks. Each sets up what it needs from a clean clone.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORE := $(wildcard fastws/_core/*.pyx fastws/_core/*.pxd)

.PHONY: run test lint bench system-deps clean

run: $(STAMP)
	$(BIN)/fastws serve

test: system-deps $(STAMP)
	$(BIN)/ruff check fastws tests benchmarks examples
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check fastws tests benchmarks examples
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks.fanout

# System packages: a C compiler and Python headers for the Cython core, venv
# for the environment. Installed with apt-get only when missing.
system-deps:
	@bash scripts/system-deps.sh

$(STAMP): pyproject.toml setup.py $(CORE)
	@bash scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) build dist *.egg-info fastws/_core/*.c fastws/_core/*.so
