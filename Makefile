# `make test` and `make setup` each do their own set-up: a virtual environment in .venv with
# torch==2.13.0 installed first (see pyproject.toml for why), then this project and its test extra.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup test format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# The formatter and the linter first (ruff, line length 100, pyproject.toml): unformatted code
# fails. pytest exits 5 when it collects no test: for this repository that means tests/ is
# broken, so it is reported as such rather than passing silently.
test: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	@$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (is tests/ missing?)"; exit 1; fi; \
	exit $$rc

# Format and fix what ruff can, in place.
format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs
