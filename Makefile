# fastnet developer tasks (GNU make and a POSIX shell; on Windows, run the pip
# and pytest commands from the README by hand).
#
#   make test        .venv with fastnet (extension built) and its test extra; the whole suite
#   make test-pure   the pure-Python package (FASTNET_NO_EXTENSIONS=1) in .venv/pure, C leg skipped
#   make serve       the example echo server in the foreground (SERVE_ARGS, default port 8080)
#   make bench       codec micro-benchmarks (pytest-benchmark, make bench-micro), then the
#                    end-to-end comparison benchmarks/compare.py (make bench-compare)
#   make soak        10,000 connections against `fastnet serve echo` for 30 minutes, nothing
#                    lost, RSS and descriptors flat (benchmarks/soak.py; SOAK_ARGS, e.g.
#                    SOAK_ARGS="--duration 300"); make soak-ci is the 60 s run CI makes
#   make build       sdist, then a wheel built from it, into dist/
#   make lint        ruff and mypy, each if installed (make lint-deps installs the pinned ones)
#   make clean       build products; make distclean removes the virtual environments too
#
# Re-runs are cheap: fastnet is installed in editable mode, so a changed .py
# file needs nothing, and the extension is rebuilt only when its sources,
# setup.py or pyproject.toml change, or when the compiled module is missing.

PYTHON ?= python3
VENV ?= .venv
PURE_VENV ?= $(VENV)/pure
PYTEST_ARGS ?=
SERVE_ARGS ?= echo --port 8080
BENCH_ARGS ?=
COMPARE_ARGS ?=
SOAK_ARGS ?=

PY := $(VENV)/bin/python
PURE_PY := $(PURE_VENV)/bin/python

# The compiled module an editable install leaves next to _frame.pyx, e.g.
# src/fastnet/_frame.cpython-311-x86_64-linux-gnu.so. Its presence and age
# tell make whether the extension needs building.
EXT_SUFFIX := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
EXTENSION := src/fastnet/_frame$(EXT_SUFFIX)
EXT_SOURCES := $(wildcard src/fastnet/*.pyx src/fastnet/*.pxd src/fastnet/*.pxi)
# Everything a non-editable install copies: the pure venv reinstalls when any changes.
PACKAGE_FILES := $(shell find src/fastnet -type f \( -name '*.py' -o -name '*.pyi' -o -name py.typed \) 2>/dev/null)

NO_EXT_GUARD = $(if $(FASTNET_NO_EXTENSIONS),$(error FASTNET_NO_EXTENSIONS is set: \
	`make $(or $(MAKECMDGOALS),all)` builds and uses the extension; unset it \
	(`make test-pure` tests the pure-Python package)))

.PHONY: all test test-pure serve bench bench-micro bench-compare soak soak-ci build lint lint-deps \
	clean distclean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(EXTENSION): pyproject.toml setup.py $(EXT_SOURCES) | $(PY)
	$(NO_EXT_GUARD)
	$(PY) -m pip install -e '.[test]'
	@test -f $@ || { echo "error: the install built no $@ (see the pip output above)" >&2; exit 1; }
	@touch $@

test: $(EXTENSION)
	$(NO_EXT_GUARD)
	$(PY) -m pytest $(PYTEST_ARGS)

$(PURE_PY):
	$(PYTHON) -m venv $(PURE_VENV)

# A normal install, not an editable one: an editable install would import
# from src/, where the extension built for .venv lies.
$(PURE_VENV)/.installed: pyproject.toml setup.py $(PACKAGE_FILES) | $(PURE_PY)
	FASTNET_NO_EXTENSIONS=1 $(PURE_PY) -m pip install '.[test]'
	@touch $@

test-pure: $(PURE_VENV)/.installed
	FASTNET_NO_EXTENSIONS=1 $(PURE_PY) -m pytest --no-c-extensions $(PYTEST_ARGS)

serve: $(EXTENSION)
	$(NO_EXT_GUARD)
	$(PY) -m fastnet serve $(SERVE_ARGS)

# The bench extra (pytest-benchmark, matplotlib) on top of the test venv.
$(VENV)/.bench-installed: pyproject.toml $(EXTENSION)
	$(NO_EXT_GUARD)
	$(PY) -m pip install -e '.[test,bench]'
	@touch $@

bench: bench-micro bench-compare

bench-micro: $(VENV)/.bench-installed
	$(NO_EXT_GUARD)
	$(PY) -m pytest benchmarks/bench_frame.py $(BENCH_ARGS)

bench-compare: $(VENV)/.bench-installed
	$(NO_EXT_GUARD)
	$(PY) benchmarks/compare.py $(COMPARE_ARGS)

# The documented soak: results and the chart (matplotlib, from the bench
# extra) go to benchmarks/results/soak.json and soak.png.
soak: $(VENV)/.bench-installed
	$(NO_EXT_GUARD)
	$(PY) benchmarks/soak.py $(SOAK_ARGS)

# CI's soak: 60 s, no chart (no matplotlib needed), results in build/soak/.
soak-ci: $(EXTENSION)
	$(NO_EXT_GUARD)
	$(PY) benchmarks/soak.py --duration 60 --no-plot --out build/soak $(SOAK_ARGS)

# `python -m build` makes the sdist first and builds the wheel from it, as a
# user's pip does from PyPI. FASTNET_NO_EXTENSIONS=1 make build gives a pure wheel.
build: | $(PY)
	$(PY) -m pip install -q 'build>=1.2'
	$(PY) -m build --outdir dist .

RUFF := $(firstword $(wildcard $(VENV)/bin/ruff) $(shell command -v ruff 2>/dev/null))
MYPY := $(firstword $(wildcard $(VENV)/bin/mypy) $(shell command -v mypy 2>/dev/null))

lint:
ifneq ($(RUFF),)
	$(RUFF) check .
	$(RUFF) format --check --diff .
else
	@echo "ruff is not installed: skipped (make lint-deps installs it)"
endif
ifneq ($(MYPY),)
	$(MYPY)
else
	@echo "mypy is not installed: skipped (make lint-deps installs it)"
endif

lint-deps: | $(PY)
	$(PY) -m pip install -r requirements/lint.txt

clean:
	rm -rf build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
	rm -f src/fastnet/*.so src/fastnet/*.pyd src/fastnet/_frame.c src/fastnet/_frame.html
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(PURE_VENV)
