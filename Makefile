# Two commands: `make demo` and `make test`. Both create .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench clean venv services real-setup build-deps faults ops-setup

$(STAMP): pyproject.toml | build-deps
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

lint: $(STAMP)
	$(BIN)/ruff check backhaul agent relay tests bench scripts
	$(BIN)/ruff format --check backhaul agent relay tests bench scripts

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

test: real-setup $(STAMP) lint typecheck services faults ops-setup
	$(BIN)/python -m pytest -q -rs -p no:cacheprovider

# wrk, sshd and friends (bench/setup.sh), the KDC and Apache of bench/winauth.py
# (real-setup), matplotlib for the chart, then every measurement.
bench: real-setup $(STAMP)
	bash bench/setup.sh
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/run.py --all

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
