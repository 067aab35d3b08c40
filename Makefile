# `make demo` and `make test` do all set-up on a fresh machine (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DOMAINBED_SRC ?= https://github.com/facebookresearch/DomainBed.git

.PHONY: setup demo test bench

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(PY) setup.cfg pyproject.toml build_hooks.py domainbed_gaqat.pth
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(VENV)/.domainbed: $(VENV)/.installed scripts/get_domainbed.sh
	scripts/get_domainbed.sh $(PY)
	touch $@

setup: $(VENV)/.domainbed

demo: setup
	$(PY) -m domainbed_gaqat demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: setup
	$(PY) -m domainbed_gaqat bench
