# fastnet developer tasks (GNU make and a POSIX shell; on Windows, run the pip
# and pytest commands from the README by hand).
#
#   make test        .venv with fastnet (extension built) and its test extra; the whole suite
#   make test-pure   the pure-Python package (FASTNET_NO_EXTENSIONS=1) in .venv/pure, C leg skipped
#   make serve       the example echo server in the foreground (SERVE_ARGS, default port 8080)
#   make bench       codec micro-benchmarks (pytest-benchmark, make bench-micro), then the
#                    end-to-end comparison benchmarks/compare.py (make bench-compare)
#   make bench-router the router set (compare.py --set router): router-echo, plain and async
#                    handlers, and a msgspec struct against plain echo, into
#                    benchmarks/results/router.{json,md}; then router_split.py's CPU per message
#   make bench-instructions the user-space instructions per frame of each echo server under
#                    valgrind (fastnet, Tokio, the Protocols), noise-free where timings are not
#                    (benchmarks/server_instructions.py; needs valgrind)
#   make bench-client fastnet.Client (one multiplexed connection, 64 connections) against a
#                    hand-written asyncio client on router-echo (benchmarks/client_bench.py)
#   make bench-tls   the TLS set of the comparison (compare.py --set tls): TLS echo, new TLS
#                    connections/s and RSS per idle TLS connection against the TLS Protocol
#                    baseline, into benchmarks/results/tls.{json,md} (COMPARE_ARGS apply)
#   make soak        10,000 connections against `fastnet serve echo` for 30 minutes, nothing
#                    lost, RSS and descriptors flat (benchmarks/soak.py; SOAK_ARGS, e.g.
#                    SOAK_ARGS="--duration 300"); make soak-ci is the 60 s run CI makes
#   make build       sdist, then a wheel built from it, into dist/
#   make lint        ruff and mypy, each if installed (make lint-deps installs the pinned ones)
#   make clean       build products; make distclean removes the virtual environments too
#   make asan        the extension built with ASan+UBSan and FASTNET_DEBUG=1 in .venv/asan, and
#                    the codec tests (and the fuzz corpora) run under the preloaded sanitizers
#   make fuzz        each fuzz/ harness for FUZZ_TIME seconds (default 180) on a clang build
#                    with libFuzzer's edge counters in the C code too, in .venv/fuzz (without
#                    clang, or with FUZZ_CC=, on make asan's gcc build); new inputs are merged,
#                    minimised, into fuzz/corpus/<harness>/
#   make fuzz-ci     each harness for FUZZ_CI_TIME=60 s, the corpora only read (CI runs it)
#   make test-matrix the non-slow suite with the extension on each CPython 3.10-3.13 found
#                    (pyenv or python3.X on PATH), each in .venv/py3.X; missing ones are skipped
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

.PHONY: all test test-pure serve bench bench-micro bench-compare bench-tls bench-router bench-client bench-instructions soak soak-ci build \
	lint lint-deps clean distclean
.PHONY: asan fuzz fuzz-ci test-matrix

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

# The TLS set needs trustme (the test extra) for its run-time certificates.
bench-tls: $(VENV)/.bench-installed
	$(NO_EXT_GUARD)
	$(PY) benchmarks/compare.py --set tls $(COMPARE_ARGS)

# The router set needs msgspec (the test extra) for its typed server.
bench-router: $(VENV)/.bench-installed
	$(NO_EXT_GUARD)
	$(PY) benchmarks/compare.py --set router $(COMPARE_ARGS)
	$(PY) benchmarks/router_split.py

# The client against a hand-written asyncio client (issue 13's targets).
bench-client: $(VENV)/.bench-installed
	$(NO_EXT_GUARD)
	$(PY) benchmarks/client_bench.py

bench-instructions: $(VENV)/.bench-installed
	$(NO_EXT_GUARD)
	$(PY) benchmarks/server_instructions.py --workloads small,rpc,large,many \
		--out benchmarks/results/server_instructions $(BENCH_ARGS)

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

# --- Sanitizers, fuzzing, the version matrix --------------------------------
# The sanitizer build is a normal (non-editable) install into its own venv, so
# it never mixes with the editable .venv build. build/ and the generated .c
# are removed around it: setuptools skips an extension whose build/ output
# looks up to date, and Cython reuses a .c generated without FASTNET_DEBUG.
ASAN_VENV ?= $(VENV)/asan
ASAN_PY := $(ASAN_VENV)/bin/python
FUZZ_TIME ?= 180
FUZZ_ARGS ?=
FUZZ_HARNESSES := $(patsubst fuzz/fuzz_%.py,%,$(wildcard fuzz/fuzz_*.py))
FUZZ_WORK := build/fuzz
CODEC_TESTS := tests/test_length_prefixed.py tests/test_lines.py tests/test_codec_edges.py \
	tests/test_buffers.py tests/test_differential.py tests/test_encode.py tests/test_fuzz_regressions.py \
	tests/test_outq.py tests/test_message_codec.py
# The sanitizer runtimes the compiler links against, preloaded because the
# python binary itself is not instrumented: ASan must come first in the
# process. Leak detection is off (CPython keeps objects alive at exit);
# allocator_may_return_null lets a huge allocation become MemoryError, as
# without ASan; PYTHONMALLOC=malloc makes every object an ASan allocation.
SANITIZER_LIBS = $(foreach lib,libasan.so libubsan.so,$(shell $(CC) -print-file-name=$(lib)))
sanitizer_env = LD_PRELOAD="$(strip $(1) $(SANITIZER_LIBS))" PYTHONMALLOC=malloc \
	ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:halt_on_error=1$(2) \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
SANITIZER_ENV = $(call sanitizer_env)
# libFuzzer's options for every run: an input takes milliseconds, so one
# that runs for 10 s is a hang; the RSS limit leaves room for ASan's shadow
# memory and quarantine on top of the 8 MiB frames the harnesses build.
LIBFUZZER_ARGS = -print_final_stats=1 -timeout=10 -rss_limit_mb=4096 $(FUZZ_ARGS)

$(ASAN_PY):
	$(PYTHON) -m venv $(ASAN_VENV)

$(ASAN_VENV)/.installed: pyproject.toml setup.py $(EXT_SOURCES) $(PACKAGE_FILES) | $(ASAN_PY)
	$(NO_EXT_GUARD)
	@for lib in $(SANITIZER_LIBS); do test -f "$$lib" || { \
		echo "error: $(CC) has no sanitizer runtime $$lib (Debian: apt-get install gcc)" >&2; exit 1; }; done
	rm -rf build src/fastnet/*.c
	FASTNET_SANITIZE=1 FASTNET_DEBUG=1 $(ASAN_PY) -m pip install '.[test,fuzz]'
	rm -rf build src/fastnet/*.c
	$(SANITIZER_ENV) $(ASAN_PY) fuzz/differential.py --require-sanitizers
	@touch $@

asan: $(ASAN_VENV)/.installed
	$(SANITIZER_ENV) $(ASAN_PY) -m pytest -p no:cacheprovider $(CODEC_TESTS) $(PYTEST_ARGS)

# The fuzzing build. With clang (FUZZ_CC: clang on PATH by default), the
# extension is compiled in its own venv, FUZZ_VENV, with
# -fsanitize=fuzzer-no-link on top of ASan+UBSan (FASTNET_SANITIZE=fuzzer):
# its inline 8-bit edge counters, PC table and comparison hooks register
# with libFuzzer, so the C code's edges guide the search as the twin's
# Python lines do. It runs with atheris's asan_with_fuzzer.so preloaded:
# clang's ASan and UBSan runtimes and libFuzzer in one library, which atheris
# then uses instead of its built-in copy ("INFO: Using preloaded libfuzzer").
# Without clang (or with FUZZ_CC= on the command line) the fuzzers fall back
# to the gcc build of `make asan`, where only Python coverage guides them.
FUZZ_CC ?= $(shell command -v clang 2>/dev/null)
FUZZ_VENV ?= $(VENV)/fuzz
# The gcc fallback runs under the sanitizer environment plus
# fuzz/sancov_forward.c, preloaded ahead of libasan so that atheris's
# libFuzzer, not libasan's no-op hooks, receives the coverage counters (the
# file says why). The clang build needs no forwarder: the preloaded
# asan_with_fuzzer.so defines the hooks itself.
SANCOV_FORWARD := $(FUZZ_WORK)/sancov_forward.so
ifneq ($(strip $(FUZZ_CC)),)
FUZZ_C_EDGES := yes ($(FUZZ_CC), -fsanitize=fuzzer-no-link, $(FUZZ_VENV))
FUZZ_PY := $(FUZZ_VENV)/bin/python
FUZZ_BUILD := $(FUZZ_VENV)/.installed
# atheris.path() is the directory that holds asan_with_fuzzer.so.
FUZZ_RUNTIME = "$$($(FUZZ_PY) -c 'import atheris, os; print(os.path.join(atheris.path(), "asan_with_fuzzer.so"))')"
# As sanitizer_env, with clang's runtimes (asan_with_fuzzer.so has UBSan's too).
FUZZ_SANITIZER_ENV = LD_PRELOAD=$(FUZZ_RUNTIME) PYTHONMALLOC=malloc \
	ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:halt_on_error=1 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
FUZZ_ENV = PATH="$(abspath $(FUZZ_VENV))/bin:$$PATH" $(FUZZ_SANITIZER_ENV)
else
FUZZ_C_EDGES := no (FUZZ_CC empty, no clang: make asan's gcc build, Python coverage only)
FUZZ_PY := $(ASAN_PY)
FUZZ_BUILD := $(ASAN_VENV)/.installed $(SANCOV_FORWARD)
# PATH: libFuzzer's -merge runs the harness again as a command (its shebang
# names python3), which must be the sanitizer venv's.
FUZZ_ENV = PATH="$(abspath $(ASAN_VENV))/bin:$$PATH" \
	$(call sanitizer_env,$(abspath $(SANCOV_FORWARD)),:verify_asan_link_order=0) \
	FASTNET_LIBFUZZER="$$($(ASAN_PY) -c 'import importlib.util as u; print(u.find_spec("atheris.core_with_libfuzzer").origin)')"
endif

$(SANCOV_FORWARD): fuzz/sancov_forward.c
	@mkdir -p $(@D)
	$(CC) -shared -fPIC -O2 -o $@ $< -ldl

$(FUZZ_VENV)/bin/python:
	$(PYTHON) -m venv $(FUZZ_VENV)

# As $(ASAN_VENV)/.installed, built by clang with FASTNET_SANITIZE=fuzzer;
# the check then also requires the edge counters and the preloaded libFuzzer.
$(FUZZ_VENV)/.installed: pyproject.toml setup.py $(EXT_SOURCES) $(PACKAGE_FILES) | $(FUZZ_VENV)/bin/python
	$(NO_EXT_GUARD)
	rm -rf build src/fastnet/*.c
	CC="$(FUZZ_CC)" FASTNET_SANITIZE=fuzzer FASTNET_DEBUG=1 $(FUZZ_PY) -m pip install '.[test,fuzz]'
	rm -rf build src/fastnet/*.c
	$(FUZZ_SANITIZER_ENV) $(FUZZ_PY) fuzz/differential.py --require-sanitizers --require-coverage
	@touch $@

# Each harness explores from the repo corpus into a scratch one; then the
# union is merged into a fresh directory that replaces the repo corpus: a
# smallest set of inputs that covers every feature any of them reached
# (-set_cover_merge), so the corpus stays a few dozen files.
fuzz: $(FUZZ_BUILD)
	@echo "== C edges instrumented: $(FUZZ_C_EDGES)"
	@set -e; for h in $(FUZZ_HARNESSES); do \
		rm -rf $(FUZZ_WORK)/$$h $(FUZZ_WORK)/$$h.min; \
		mkdir -p fuzz/corpus/$$h $(FUZZ_WORK)/$$h $(FUZZ_WORK)/$$h.min; \
		echo "== fuzz $$h for $(FUZZ_TIME) s"; \
		$(FUZZ_ENV) $(FUZZ_PY) fuzz/fuzz_$$h.py $(LIBFUZZER_ARGS) -max_total_time=$(FUZZ_TIME) \
			-artifact_prefix=$(FUZZ_WORK)/$$h- $(FUZZ_WORK)/$$h fuzz/corpus/$$h; \
		$(FUZZ_ENV) $(FUZZ_PY) fuzz/fuzz_$$h.py -set_cover_merge=1 \
			$(FUZZ_WORK)/$$h.min fuzz/corpus/$$h $(FUZZ_WORK)/$$h 2>&1 | grep -v '^INFO: Instrumenting' | tail -n 2; \
		rm -rf fuzz/corpus/$$h; cp -r $(FUZZ_WORK)/$$h.min fuzz/corpus/$$h; \
		echo "== $$h: $$(ls fuzz/corpus/$$h | wc -l) inputs kept in fuzz/corpus/$$h"; \
	done

# As fuzz, for FUZZ_CI_TIME seconds each; the repo corpus is only read (seeds).
FUZZ_CI_TIME ?= 60
fuzz-ci: $(FUZZ_BUILD)
	@echo "== C edges instrumented: $(FUZZ_C_EDGES)"
	@set -e; for h in $(FUZZ_HARNESSES); do \
		rm -rf $(FUZZ_WORK)/$$h; mkdir -p $(FUZZ_WORK)/$$h; \
		echo "== fuzz $$h for $(FUZZ_CI_TIME) s"; \
		$(FUZZ_ENV) $(FUZZ_PY) fuzz/fuzz_$$h.py $(LIBFUZZER_ARGS) -max_total_time=$(FUZZ_CI_TIME) \
			-artifact_prefix=$(FUZZ_WORK)/$$h- $(FUZZ_WORK)/$$h fuzz/corpus/$$h; \
	done

# A CPython X.Y: python3.X on PATH if it runs (a pyenv shim of a version
# that is not selected does not), else the newest pyenv-installed X.Y.*.
FIND_PYTHON = for c in python$$v $$(ls -d "$$(pyenv root 2>/dev/null || echo "$${PYENV_ROOT:-$$HOME/.pyenv}")"/versions/$$v.*/bin/python 2>/dev/null | sort -V | tail -n 1); do \
	if "$$c" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$$v'.split('.'))))" 2>/dev/null; then \
		py=$$c; break; fi; done

# The non-slow suite on each CPython 3.10-3.13 this machine has, each in its
# own venv with a non-editable install (the editable .venv's extension in src/
# is built for one version only); a version not found is reported and skipped.
test-matrix:
	@set -e; ran=""; failed=""; for v in 3.10 3.11 3.12 3.13; do \
		py=""; $(FIND_PYTHON); \
		if [ -z "$$py" ]; then echo "== CPython $$v: not found, skipped"; continue; fi; \
		echo "== CPython $$v: $$py"; \
		test -x $(VENV)/py$$v/bin/python || "$$py" -m venv $(VENV)/py$$v; \
		rm -rf build src/fastnet/*.c; \
		$(VENV)/py$$v/bin/python -m pip install -q '.[test]'; \
		$(VENV)/py$$v/bin/python -c 'import fastnet, sys; assert fastnet.ACCELERATED, "no extension"; print("fastnet", fastnet.__version__, "accelerated, CPython", sys.version.split()[0])'; \
		if $(VENV)/py$$v/bin/python -m pytest -p no:cacheprovider -x -q -m "not slow" $(PYTEST_ARGS); \
		then ran="$$ran $$v"; else failed="$$failed $$v"; fi; \
	done; \
	echo "== test-matrix: passed on:$${ran:- none}; failed on:$${failed:- none}"; \
	test -n "$$ran" && test -z "$$failed"

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
