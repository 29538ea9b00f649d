# The two commands: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench orthanc clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/casb run

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check casb addons tests bench
	$(BIN)/ruff format --check casb addons tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/policy.py
	$(BIN)/python bench/proxy_overhead.py
	$(BIN)/python bench/dlp.py
	$(BIN)/python bench/upload_stream.py
	$(BIN)/python bench/envelope.py
	$(BIN)/python bench/state.py

# A local Orthanc with the DICOMweb plugin on :8042, for the README walkthrough
# (needs the Debian packages orthanc and orthanc-dicomweb).
orthanc: $(STAMP)
	$(BIN)/python -m tests.support.orthanc --port 8042

clean:
	rm -rf $(VENV) .casb build *.egg-info
