# The two commands of the README:  make run  (set up + nightly job)  and  make test.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: install run test benchmark-ingest clean

# Installs the pinned set (constraints.txt) into a local virtual environment, once per change of
# pyproject.toml or constraints.txt.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,crf]'
	touch $@

install: $(VENV)/.installed

# The main job: the nightly flow over the bundled sample catalog, embedded Prefect + MLflow.
run: install
	$(BIN)/tilewise run nightly

test: install
	$(BIN)/python -m pytest -q

benchmark-ingest: install
	$(BIN)/python benchmarks/ingest.py

clean:
	rm -rf .tilewise .pytest_cache
