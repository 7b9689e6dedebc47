# `make demo` and `make test` set up .venv themselves (python3 -m venv + pip) on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= crosspatch-out

.PHONY: install dev demo test bench bench-env tl-agreement coverage gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# A regular (non-editable) install: the tests run against the installed package.
install: $(BIN)/python
	$(BIN)/pip install --quiet ".[all,dev]"

# An editable install for working on crosspatch itself. Strict mode lays the package out as installed
# (links under build/), so lint-imports finds crosspatch.adapters; a new module needs `make dev` again.
dev: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[all,dev]" --config-settings editable_mode=strict

demo: install
	$(BIN)/python examples/ioi_study.py --out $(OUT)

# The plugins are installed as a user would install them, so their entry points are exercised.
# Ray (the `ray` extra) only for the Ray executor's tests, so `make demo` does not pull it in.
# lint-imports checks the layer contracts of pyproject.toml against the installed package.
test: install
	$(BIN)/pip install --quiet ".[ray]" ./plugins/crosspatch-torchvision ./plugins/crosspatch-template
	$(BIN)/lint-imports --no-logo --no-cache
	$(BIN)/python -m pytest -q tests plugins/crosspatch-torchvision/tests plugins/crosspatch-template/tests

BENCH := .venv-bench

$(BENCH)/bin/python:
	$(PYTHON) -m venv $(BENCH)

# The peers (TransformerLens, pyvene, nnsight) live only in .venv-bench, never in .venv.
bench-env: $(BENCH)/bin/python
	$(BENCH)/bin/pip install --quiet torch==2.14.1
	$(BENCH)/bin/pip install --quiet -e ".[bench]"

bench: bench-env
	$(BENCH)/bin/python benchmarks/run_all.py
	$(BENCH)/bin/python benchmarks/tl_agreement.py
	$(BENCH)/bin/python benchmarks/sae_lens_agreement.py

# crosspatch against TransformerLens (or hand-written hooks) on the same weights, family by family.
tl-agreement: bench-env
	$(BENCH)/bin/python benchmarks/tl_agreement.py

# On a machine with a CUDA GPU: conformance there, one timed sweep, AtP and EAP against TransformerLens (one table).
gpu-check: bench-env
	$(BENCH)/bin/python benchmarks/gpu_check.py

# Which transformers model types are served, and how: builds a tiny model of every type, writes docs/coverage.md.
coverage: install
	$(BIN)/python tools/coverage.py

clean:
	rm -rf build dist *.egg-info $(OUT) .pytest_cache
