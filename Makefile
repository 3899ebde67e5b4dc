# The two Quickstart commands: `make demo` and `make test`. Each bootstraps ./.venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast stack install postgres chromium clean

# The bundled model's recommended settings apply: UniPC, 10 steps, one shot per prompt, image scale 5 (docs/models.md).
demo: $(VENV)/.installed
	$(BIN)/dreamcache run --compare-text-only

# Both on pytest-xdist's workers (`-n auto`, pyproject.toml); the layers are the markers tests/conftest.py gives.
test: $(VENV)/.installed postgres chromium
	$(BIN)/pytest --durations=25

# The unit layer without the slow tests: no server, no catalogue run, no compile or benchmark (README "Tests").
test-fast: $(VENV)/.installed
	$(BIN)/pytest -m "unit and not slow" --durations=10

# PostgreSQL, S3 (moto) and a Prefect server on this host without Docker, until Ctrl-C (docs/operations.md).
stack: $(VENV)/.installed postgres
	$(BIN)/dreamcache stack up

# The tests start a real PostgreSQL server from Debian's binaries; install them if they are missing.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	  { echo "The tests need PostgreSQL's server binaries: sudo apt-get install postgresql" >&2; exit 1; }

install: $(VENV)/.installed

# Rebuilt whenever the dependencies in pyproject.toml change.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

# The browser test drives Debian's Chromium (Playwright cannot download its own browsers here).
chromium:
	@command -v chromium >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  { echo "The browser test needs Chromium: sudo apt-get install chromium" >&2; exit 1; }

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
