# Every target builds .venv itself; pip re-runs only when pyproject.toml changes
# (stamp files).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.stamp-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

$(VENV)/.stamp-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $@

$(VENV)/.stamp-docs: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[docs]'
	touch $@

# Class-incremental split digits (scikit-learn's bundled 8x8 digits, offline): ten methods
# (SGD, Adam, soft_mask, SI, LwF, A-GEM, GEM, ER, DER, DER++) over 3 seeds; prints the
# table (ACC, BWT, forgetting, samples/s; FWT `-`, undefined in class-IL) and writes
# results/demo/ (results.jsonl, PNG plots). SGD, Adam, soft_mask, SI, LwF and A-GEM forget
# the earlier classes; GEM, ER, DER and DER++ keep them. It needs about 1.5 minutes of CPU
# time, so at most about 1.5 minutes on 2 idle cores (after the first install of .venv);
# longer on a loaded machine.
DEMO_METHODS := sgd,adam,soft_mask,si,lwf,agem,gem,er,der,derpp
demo: $(VENV)/.stamp-bench
	$(BIN)/python -m benchmarks.continual --stream split-digits --scenario class \
	  --methods $(DEMO_METHODS) --seeds 3 --out results/demo

# The suite runs on every core (pytest-xdist; XLA's compiler is mostly single-threaded, so
# one process per core). The suite compiles without most of XLA's optimisation passes
# (tests/conftest.py). `test-fast` leaves out the `slow` tests: end-to-end and multi-device
# runs, the battery's wrapper and bfloat16 properties (tests/test_common.py), and unit tests
# that take more than a few seconds.
PYTEST := $(BIN)/python -m pytest -n auto --dist worksteal
test: $(VENV)/.stamp-test
	$(PYTEST)

test-fast: $(VENV)/.stamp-test
	$(PYTEST) -m "not slow"

# ruff lints and checks the formatting; pyright type-checks cl_optax/ in basic mode
# ([tool.pyright] in pyproject.toml points it at .venv). Why pyright: equinox runs it (in
# its .pre-commit-config.yaml); the `pyright` package on PyPI ships the checker and its
# `nodejs` extra installs Node.js as a wheel, so it comes from the package index with the
# test extra and adds nothing to the library's runtime dependencies. pytype, the other
# checker of JAX projects, supports Python up to 3.12 only (its last supported version).
LINTED := cl_optax tests examples benchmarks docs/_ext
lint: $(VENV)/.stamp-test
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/pyright

# The site (mkdocs.yml): pages in docs/, the API reference from the docstrings
# (mkdocstrings); --strict turns every warning into an error. Output: site/.
# NO_MKDOCS_2_WARNING silences Material for MkDocs' end-of-life notice (see mkdocs.yml).
docs: $(VENV)/.stamp-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) results site .pytest_cache .hypothesis .ruff_cache
