# `make demo` and `make test` do all set-up on a fresh machine (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DOMAINBED_SRC ?= https://github.com/facebookresearch/DomainBed.git

.PHONY: setup demo test test-fast test-paper coverage bench mutation

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml build_hooks.py domainbed_gaqat.pth
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(VENV)/.domainbed: $(VENV)/.installed scripts/get_domainbed.sh
	scripts/get_domainbed.sh $(PY)
	touch $@

setup: $(VENV)/.domainbed

demo: setup
	$(PY) -m domainbed_gaqat demo

# The whole suite but the paper configs (the Slurm tests included: they start a one-node
# cluster on loopback, as root); test-fast is the edit-run loop (no subprocess-heavy tests);
# both run the package's docstring examples too (--doctest-modules, pyproject.toml);
# test-paper runs every paper config end to end on tiny image folders (about 15 minutes);
# coverage trains every DomainBed algorithm x {FP, LSQ, QTDoG} through DomainBed's train.py
# and compares docs/coverage.md with the runs (about 15 minutes; make test checks the page
# against the registry only).
# TEST_WORKERS: pytest-xdist processes, each module one unit of work (module fixtures run
# once; conftest.py starts the long modules first); TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not paper and not coverage"

test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow and not paper and not coverage"

test-paper: setup
	$(PY) -m pytest -q -m paper

coverage: setup
	$(PY) -m pytest -q -m coverage

bench: setup
	$(PY) -m domainbed_gaqat bench

# Mutation testing (not part of `make test`: about an hour on 2 cores). mutmut mutates the
# quantization and optimisation cores and the selection / tables code ([tool.mutmut] in
# pyproject.toml) and runs, for each mutant, the fast tests that reach the mutated function;
# then the score per module and the surviving mutants (docs/testing.md explains them).
MUTMUT_CHILDREN ?= 2
mutation: setup
	rm -rf mutants
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTMUT_CHILDREN) > mutation.log 2>&1 \
		|| (tail -40 mutation.log; exit 1)
	$(PY) scripts/mutation_report.py --diffs
