# `make demo` and `make test` build .venv themselves; pip re-runs only when
# pyproject.toml changes (stamp files).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.stamp-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

$(VENV)/.stamp-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $@

# Split digits (offline), every registered method (14), 3 seeds: table + results/demo/*.png;
# about 2 minutes on 2 CPU cores (2 min 04 s measured, JAX 0.10.2, CPU)
demo: $(VENV)/.stamp-bench
	$(BIN)/python -m benchmarks.continual --stream split-digits --seeds 3 --out results/demo

test: $(VENV)/.stamp-test
	$(BIN)/python -m pytest

lint: $(VENV)/.stamp-test
	$(BIN)/python -m ruff check cl_optax tests examples benchmarks

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
