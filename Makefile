# Two entry points, both doing their own set-up on a fresh clone:
#   make demo   the main job on embedded defaults (local Ray, SQLite, tiny CPU models)
#   make test   the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test lint system-packages

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/cutover demo

# Tests need two Debian packages: chromium (the report test) and tesseract-ocr (the second OCR
# engine). As root they are installed here; otherwise those tests skip, saying why (under CI they fail).
system-packages:
	@for pkg in chromium:chromium tesseract:tesseract-ocr; do \
	  command -v $${pkg%%:*} >/dev/null || [ "$$(id -u)" != 0 ] || apt-get install -y -q $${pkg#*:} >/dev/null 2>&1 \
	    || (apt-get update -q >/dev/null && apt-get install -y -q $${pkg#*:} >/dev/null) || true; \
	done

# pytest exits 5 when it collected nothing: that is a failure here, never green.
# The two-node Ray cluster test (marker `cluster`) runs after the main suite, in a pytest
# process of its own, so two Ray clusters never share the machine; with PYTEST_ARGS
# (a chosen subset) only that subset runs.
test: setup system-packages
	@if [ -n "$(PYTEST_ARGS)" ]; then set -- $(PYTEST_ARGS); else set -- -m "not cluster"; fi; \
	$(PY) -m pytest "$$@"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; \
	if [ $$rc -ne 0 ] || [ -n "$(PYTEST_ARGS)" ]; then exit $$rc; fi; \
	$(PY) -m pytest -m cluster; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no cluster test collected: failing" >&2; exit 1; fi; exit $$rc

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
