# Entry points, each creating or reusing .venv from nothing but Python 3:
#   make demo        set up and run the demo
#   make test        set up, run the whole test suite and build the docs site (strict)
#   make test-fast   the tests not marked slow, for the edit loop
#   make docs        build the docs site into site/
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]' 2>&1 | { grep -v '^WARNING: Location' || true; } \
	  || { echo "setup failed (pip's message above); .venv needs about 7 GB of disk, $$(df -h . | awk 'NR==2 {print $$4}') free here" >&2; exit 1; }
	$(PY) -c "import pathomics, openslide, zarr, torch"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pathomics demo --out demo-out

test: $(STAMP)
	$(PY) -m pytest -q -n auto
	$(MAKE) --no-print-directory docs

test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto -m "not slow"

# offline: the CLI reference is generated from the parsers (docs/hooks.py), the API reference from docstrings
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site

clean:
	rm -rf $(VENV) demo-out site
