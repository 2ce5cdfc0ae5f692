# Two entry points for a newcomer: `make demo` and `make test`. Each sets the machine up first
# (scripts/bootstrap.sh is idempotent), so both work on a fresh Debian 12 or RHEL 9 host as root.

VENV    := .venv
PY      := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test test-compiled test-pure setup setup-dev lint typecheck unit bench results fuzz rpm clean

demo: setup
	$(VENV)/bin/clearip-proxy demo

# The whole suite twice: on the compiled SIP core (what setup-dev builds), then on its
# pure-Python fallback (CLEARIP_PURE_PYTHON=1, see relay/__init__.py), which must keep working.
test: setup-dev lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)
	@echo "make test: again on the pure-Python core (CLEARIP_PURE_PYTHON=1)"
	CLEARIP_PURE_PYTHON=1 $(PY) -m pytest $(PYTEST_ARGS)

# One pass only, on the compiled core or on the pure-Python one.
test-compiled: setup-dev
	$(PY) -m pytest $(PYTEST_ARGS)

test-pure: setup-dev
	CLEARIP_PURE_PYTHON=1 $(PY) -m pytest $(PYTEST_ARGS)

setup:
	@bash scripts/bootstrap.sh

setup-dev:
	@bash scripts/bootstrap.sh --dev

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy reads the sources through a link farm shaped like the installed namespace
# (clearip/relay -> relay/ ...), so module names match what the code imports.
typecheck:
	@mkdir -p build/typecheck/clearip
	@for d in relay ctl bpf; do ln -sfn ../../../$$d build/typecheck/clearip/$$d; done
	cd build/typecheck && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p clearip.relay -p clearip.ctl -p clearip.bpf

# Coverage-guided fuzzing of the parser, the stream framer and the datagram path.
FUZZ_SECONDS ?= 120
fuzz: setup-dev
	for t in parser framer datagram; do $(PY) -m fuzz.run $$t $(FUZZ_SECONDS) build/fuzz-$$t || exit 1; done

bench: setup-dev
	$(PY) -m bench.parse

# Issue 10: the call benchmarks' report (bench/RESULTS.md, bench/results.png; ~15 minutes).
# REPORT_ARGS, e.g. "--rates 500 --seconds 20 --no-capacity", is passed to bench.report.
REPORT_ARGS ?=
results: setup-dev
	@$(PY) -c "import matplotlib" 2>/dev/null || $(VENV)/bin/pip install -q -e ".[bench]"
	$(PY) -m bench.report $(REPORT_ARGS)

# RHEL 9 package (issue 9): RPM and source RPM in build/rpm/RPMS and build/rpm/SRPMS.
# RPM_PYTHON: a Python 3.11 with pip and venv (default: the venv's, else python3.11).
RPM_PYTHON ?=

rpm:
	PYTHON="$(RPM_PYTHON)" bash packaging/rpm/build.sh

clean:
	rm -rf build dist *.egg-info .mypy_cache .pytest_cache .ruff_cache
