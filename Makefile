# The two Quickstart commands: `make demo` and `make test`. Each bootstraps ./.venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

demo: $(VENV)/.installed
	$(BIN)/dreamcache demo

test: $(VENV)/.installed
	$(BIN)/pytest

install: $(VENV)/.installed

# Rebuilt whenever the dependencies in pyproject.toml change.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
