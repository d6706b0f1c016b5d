# The two commands of the README:  make run  (set up + nightly job)  and  make test.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: install chromium run test test-stage2 benchmark-ingest clean

# Installs the pinned set (constraints.txt) into a local virtual environment, once per change of
# pyproject.toml or constraints.txt. (PYTHONWARNINGS: setuptools warns that a folder named like a
# package could shadow it during imports; ours are the package.)
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	PYTHONWARNINGS=ignore::UserWarning $(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,crf]'
	touch $@

install: $(VENV)/.installed

# The main job: the nightly flow over the bundled sample catalog, embedded Prefect + MLflow.
run: install
	$(BIN)/tilewise run nightly

# The screenshot test (tests/test_ui_screenshots.py) drives a headless Chromium: Debian's, installed
# here when we are root; otherwise that test is skipped and says so.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the screenshot test"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; \
	  else \
	    echo "chromium is missing and only root can install it (apt-get install -y chromium):" \
	         "the screenshot test will be skipped"; \
	  fi; }

# The suite in two stages (CI, .ci/run, runs both): everything but the real servers and clusters
# and the many-scans runs (about 15 minutes on 2 cores), then those (tests marked servers or scale).
test: install chromium
	$(BIN)/python -m pytest -q -m "not servers and not scale"

test-stage2: install
	$(BIN)/python -m pytest -q -m "servers or scale"

benchmark-ingest: install
	$(BIN)/python benchmarks/ingest.py

clean:
	rm -rf .tilewise .pytest_cache
