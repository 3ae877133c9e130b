# `make demo` and `make test` build .venv themselves; pip re-runs only when
# pyproject.toml changes (stamp files).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.stamp-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

$(VENV)/.stamp-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $@

# Class-incremental split digits (offline), 3 seeds: SGD, Adam, soft_mask, SI, LwF and A-GEM
# forget (16-20 % accuracy), GEM, ER, DER, DER++ do not (84-93 %); table + results/demo/*.png.
# Measured: 93 s of CPU time (90 s user, 3 s sys; JAX 0.10.2, CPU), wall 391 s on 2 cores
# shared with ~8 other jobs; on 2 idle cores the wall time is at most about the CPU time.
DEMO_METHODS := sgd,adam,soft_mask,si,lwf,agem,gem,er,der,derpp
demo: $(VENV)/.stamp-bench
	$(BIN)/python -m benchmarks.continual --stream split-digits --scenario class \
	  --methods $(DEMO_METHODS) --seeds 3 --out results/demo

# The suite runs on every core (pytest-xdist; XLA's compiler is mostly single-threaded, so
# one process per core); `test-fast` leaves out the `slow` end-to-end and multi-device runs.
PYTEST := $(BIN)/python -m pytest -n auto --dist worksteal
test: $(VENV)/.stamp-test
	$(PYTEST)

test-fast: $(VENV)/.stamp-test
	$(PYTEST) -m "not slow"

lint: $(VENV)/.stamp-test
	$(BIN)/python -m ruff check cl_optax tests examples benchmarks

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
