# The ways in: `make run` starts a node on :8080, `make test` runs the suite,
# `make bench` the benchmarks. Each sets up what it needs from a clean clone.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORE := $(wildcard fastws/_core/*.pyx fastws/_core/*.pxd)

.PHONY: run test lint bench conformance-long system-deps clean

run: $(STAMP)
	$(BIN)/fastws serve

test: system-deps $(STAMP)
	$(BIN)/ruff check fastws tests benchmarks examples
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check fastws tests benchmarks examples
	$(BIN)/mypy

# Every scenario against fastws and its peers, three runs each (~30 minutes);
# `python -m benchmarks --help` for one scenario, fewer servers or runs.
bench: $(STAMP)
	$(BIN)/python -m benchmarks

# Autobahn's long cases: 9.x (messages up to 16 MiB) and all of the
# permessage-deflate groups 12 and 13; minutes long, so not part of
# `make test`, which runs a quick part of them. Reports go to build/autobahn/.
conformance-long: $(STAMP)
	FASTWS_MAX_MESSAGE_SIZE=16777216 FASTWS_MAX_SEND_BUFFER=67108864 \
	FASTWS_COMPRESSION=true FASTWS_COMPRESSION_MIN_SIZE=0 \
	$(BIN)/python examples/echo.py --port 9001 & \
	echo=$$!; sleep 2; \
	$(BIN)/kosoku 127.0.0.1:9001 -p 2 -i '9.*' -i '12.*' -i '13.*' -o build/autobahn; \
	status=$$?; kill $$echo; exit $$status

# System packages: a C compiler and Python headers for the Cython core, venv
# for the environment; Chromium, redis-server, nginx and prometheus for the
# tests (the browser client, the Redis broker, the load-balancer test, a real
# scrape of /metrics). Installed with apt-get only when missing.
system-deps:
	@bash scripts/system-deps.sh test

$(STAMP): pyproject.toml setup.py $(CORE)
	@bash scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) build dist *.egg-info fastws/_core/*.c fastws/_core/*.so
