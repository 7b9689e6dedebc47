# `make demo` and `make test` set up .venv themselves (python3 -m venv + pip) on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= crosspatch-out

.PHONY: install dev demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# A regular (non-editable) install: the tests run against the installed package.
install: $(BIN)/python
	$(BIN)/pip install --quiet ".[all,dev]"

# An editable install for working on crosspatch itself.
dev: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[all,dev]"

demo: install
	$(BIN)/python examples/ioi_study.py --out $(OUT)

# The plugins are installed as a user would install them, so their entry points are exercised.
test: install
	$(BIN)/pip install --quiet ./plugins/crosspatch-torchvision ./plugins/crosspatch-template
	$(BIN)/python -m pytest -q tests plugins/crosspatch-torchvision/tests plugins/crosspatch-template/tests

clean:
	rm -rf build dist *.egg-info $(OUT) .pytest_cache
