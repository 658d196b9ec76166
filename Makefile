# Two commands: `make demo` and `make test`. Both create .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench clean venv services real-setup build-deps faults ops-setup compiled

$(STAMP): pyproject.toml | build-deps
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

lint: $(STAMP)
	$(BIN)/ruff check backhaul agent relay tests bench scripts setup.py
	$(BIN)/ruff format --check backhaul agent relay tests bench scripts setup.py

typecheck: $(STAMP)
	$(BIN)/mypy

# Kerberos for the agent (gssapi, krb5) builds against libkrb5-dev.
build-deps:
	bash tests/real/setup.sh --build-deps

# The real KDC, Apache and friends of tests/real (installed, never started as services).
real-setup:
	bash tests/real/setup.sh

services:
	bash scripts/services.sh

# iproute2 and nftables for the network fault tests of tests/faults.
faults:
	bash tests/faults/setup.sh

# squid, htpasswd, chromium and systemd-analyze for tests/ops (installed, never started as
# services).
ops-setup:
	bash tests/ops/setup.sh

# Every test from source, then the end-to-end tests again against the mypyc build.
test: real-setup $(STAMP) lint typecheck services faults ops-setup
	$(BIN)/python -m pytest -q -rs -p no:cacheprovider
	$(MAKE) compiled
	BACKHAUL_TEST_BUILD=$(COMPILED) $(BIN)/python -m pytest -q -rs -p no:cacheprovider tests/e2e

# wrk, sshd and friends (bench/setup.sh), the KDC and Apache of bench/winauth.py
# (real-setup), matplotlib for the chart, the compiled build, then every measurement.
bench: real-setup $(STAMP)
	bash bench/setup.sh
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(MAKE) compiled
	$(BIN)/python bench/run.py --all --build compiled

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache

# The compiled build of the data path: the wheel that setup.py builds with BACKHAUL_MYPYC=1
# (as the container images do), unpacked. PYTHONPATH=build/compiled runs it; bench/run.py
# measures it when it is there, and `make test` runs the end-to-end tests against it.
COMPILED := build/compiled
SOURCES := $(shell find backhaul agent relay -name '*.py' -not -path '*/__pycache__/*') setup.py
$(COMPILED)/.built: $(SOURCES) | $(STAMP)
	rm -rf build  # a wheel built over an earlier build would carry its extensions too
	BACKHAUL_MYPYC=1 $(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w build/wheel .
	$(BIN)/python -m zipfile -e build/wheel/backhaul-*.whl $(COMPILED)
	touch $@

compiled: $(COMPILED)/.built
