# CellAtlas: `make demo` (build + serve a synthetic atlas), `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/cellatlas demo --home .demo-atlas

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check atlas indexer api tests

clean:
	rm -rf $(VENV) .demo-atlas .pytest_cache
