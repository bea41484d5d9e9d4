# The two commands a new user runs (see README):  make demo   |   make test
# Everything they need is installed here: a virtualenv with the project and its extras,
# and the Debian packages the tests use when the machine lacks them.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo bench lint setup clean

$(STAMP): pyproject.toml
	@bash .ci/setup-system
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev,bench,aws]'
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	@bash .ci/setup-system --tests
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m pgregistry demo $(DEMO_ARGS)

# The benchmark's peers (psycopg2_pool, psycopg_pool, psycopg 3, SQLAlchemy) are the `bench`
# extra, installed with the rest (the test suite runs the benchmark's --quick smoke run).
# Options in BENCH_ARGS (--quick, --json FILE, --cpu N, ...).
bench: $(STAMP)
	$(PY) bench/bench.py $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check pools registry schemas tests examples bench
	MYPY=$(VENV)/bin/mypy bash .ci/typecheck

clean:
	rm -rf $(VENV) build *.egg-info
