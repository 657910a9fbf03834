# One command per job; each sets up the virtual environment first (idempotent).
#   make demo    install, train a RIM agent on CartPoleNoVel-v1 with the default config, evaluate it
#   make test    install, run the test suite (what CI runs)
#   make lint    ruff
#   make bench   the speed benchmarks under scripts/
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# pytest-xdist workers for `make test` (0: one process). Each worker gets its share of the cores as torch threads
# (tests/conftest.py); the learning tests set one thread themselves, so their results are those of a serial run.
TEST_WORKERS ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned (here pip finds a local CPU wheel; PyPI's Linux wheel bundles CUDA); a torch already in
	# the environment is kept, and the project's torch>=2.3 requirement then installs nothing more.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/rims-rl train --env CartPoleNoVel-v1 --policy rims --run-dir runs/demo --overwrite
	$(BIN)/rims-rl evaluate runs/demo

test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python scripts/benchmark_core.py
	$(BIN)/python scripts/benchmark_atari.py

clean:
	rm -rf $(VENV) runs .pytest_cache
