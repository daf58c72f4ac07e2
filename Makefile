# slm360-rasa developer entry points. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export RASA_TELEMETRY_ENABLED := false
export PYTHONHASHSEED := 0

.PHONY: help setup test test-fast tokenizer bench bot clean-venv

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

# Build .venv from nothing with a Python 3.10 interpreter (Rasa 3.6 supports 3.8-3.10 only).
$(PY):
	@set -e; \
	interp="$$(bash scripts/find_python310.sh)"; \
	echo "using $$interp ($$($$interp --version 2>&1))"; \
	$$interp -m venv $(VENV); \
	$(PY) -m pip install --quiet --upgrade pip "setuptools<70" wheel; \
	$(PY) -m pip install --quiet -e ".[rasa,dev]"

setup: $(PY)  ## create .venv (Python 3.10) and install -e .[rasa,dev]

test: $(PY)  ## run the whole test suite (builds .venv first if missing)
	$(PY) -m pytest -q tests

test-fast: $(PY)  ## tests without the slow end-to-end Rasa runs
	$(PY) -m pytest -q -m "not slow" tests

tokenizer: $(PY)  ## retrain nano/assets/tokenizer.json from the corpus (CORPUS=path)
	$(PY) -m slm360_rasa.cli tokenizer $(if $(CORPUS),--corpus $(CORPUS),)

bench: $(PY)  ## encoder latency / throughput / size benchmark
	$(PY) -m benchmarks.bench_encoder

bot: $(PY)  ## train the example restaurant bot (example_bot/) and chat with it in the terminal
	cd example_bot && $(abspath $(VENV))/bin/rasa train --out models
	cd example_bot && $(abspath $(VENV))/bin/rasa shell --model models

clean-venv:  ## remove .venv
	rm -rf $(VENV)
