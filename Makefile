# Everything runs from a local virtual environment that these targets create and reuse.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)

.PHONY: demo test bench browser clean-venv

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel setuptools
	$(BIN)/pip install --quiet -e '.[test,bench]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

## demo: generate a 100K pool, cluster it, select a 10K cluster-margin batch (DirectRunner)
demo: $(STAMP)
	$(BIN)/python -m clusmar_beam.app.demo --workdir $${DEMO_DIR:-demo-output}

## browser: Debian's chromium, which the report tests render pages in (needs root and Debian's packages)
browser:
	test -x /usr/bin/chromium || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

## test: install what the tests need and run the whole suite
test: $(STAMP) browser
	$(BIN)/python -m pytest -q tests

## bench: the 1M-example benchmark (see benchmarks/RESULTS.md)
bench: $(STAMP)
	bash benchmarks/run_1m.sh

clean-venv:
	rm -rf $(VENV)
