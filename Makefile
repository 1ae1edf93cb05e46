# The two commands a fresh machine needs (README "Quick start"); each creates .venv when missing.
#   make demo   set up, then the whole recipe on the embedded toy task (`nemokern demo $(ARGS)`)
#   make test   set up, then the style checks and the test suite, exactly what CI runs (with
#               the environment's bin/ first on PATH, as an activated one would have it)
# torch==2.13.0 goes in first (the CPU wheel on a CPU machine); a .venv that already has a torch,
# a CUDA build say, keeps it. VENV=DIR uses another environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nemokern-installed
ARGS ?=

.PHONY: setup demo test
setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: $(STAMP)
	$(BIN)/nemokern demo $(ARGS)

test: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q $(ARGS)
