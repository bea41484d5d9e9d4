# The two commands a new user runs (see README):  make test   |   make demo
# Everything they need is installed here: a virtualenv with the project and its extras,
# and the Debian packages the tests use when the machine lacks them.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: test demo bench lint setup clean

$(STAMP): pyproject.toml
	@bash .ci/setup-system
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m registry demo $(DEMO_ARGS)

# The benchmark's peers (psycopg2_pool, psycopg_pool, psycopg 3, SQLAlchemy) live in the
# `bench` extra, installed into the same venv. Options in BENCH_ARGS (--quick, --json FILE...).
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[test,dev,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) bench/bench.py $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check pools registry schemas tests examples bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info
