# Two commands do all set-up: `make demo` and `make test` (both create .venv first if needed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow smoke-real lint format bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-compile -e ".[test]"
	touch $@

demo: setup
	$(BIN)/saerl demo

# Two workers, a test file each at a time (module fixtures are built once); they share one XLA cache.
test: setup lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

smoke-real: setup
	$(BIN)/python scripts/smoke_real.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[test,bench]"
	touch $@

bench: setup $(VENV)/.bench-installed
	$(BIN)/python benchmarks/bench_model.py
	$(BIN)/python benchmarks/bench_sae.py
	$(BIN)/python benchmarks/bench_extract.py
	$(BIN)/python benchmarks/bench_engineer.py
	$(BIN)/python benchmarks/bench_grpo.py
	$(BIN)/python benchmarks/bench_accelerator.py
