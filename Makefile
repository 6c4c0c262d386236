# Ember's entry points. The README's two set-up commands are `make dev` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PYTEST_ARGS ?=

.PHONY: dev install install-dev system-deps cluster-build lint test test-unit test-py312 crds

## dev: install Ember and run local mode (activator + sandboxed agents) on examples/
dev: install
	-$(MAKE) --no-print-directory system-deps-dev
	ember dev examples

install:
	$(PIP) install -q -e .

install-dev:
	$(PIP) install -q -e '.[dev]'

## system-deps-dev: the gVisor sandbox for local mode (Debian's runsc); optional, ember dev warns without it
system-deps-dev:
	@if command -v runsc >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -qq runsc >/dev/null || (apt-get update -qq && apt-get install -y -qq runsc >/dev/null); \
	else echo "runsc (gVisor) not installed: functions will run unsandboxed; see README"; fi

## system-deps: every Debian package the test tiers need (containerd, runsc, etcd, buildah, ...)
system-deps:
	bash tests/cluster/install-deps.sh

## cluster-build: build (or reuse from ~/.cache/ember) Kubernetes, gVisor and the test images
cluster-build:
	$(PYTHON) -m tests.cluster build

lint:
	ruff check operator tests bench runtime-images
	ruff format --check operator tests bench runtime-images
	mypy
	lint-imports

crds:
	ember crds

test-unit:
	$(PYTHON) -m pytest tests/unit -q $(PYTEST_ARGS)

## test-py312: the unit tier again on Python 3.12, in its own virtualenv (python3.12 on PATH, or pyenv's)
test-py312:
	@py312=$$(python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1); \
	if [ -z "$$py312" ]; then echo "python3.12 not found: install Python 3.12 to run the 3.12 unit tier" >&2; exit 1; fi; \
	echo "unit tier on $$py312"; \
	$$py312 -m venv .venv-py312 && .venv-py312/bin/pip install -q -e '.[dev]' && \
	.venv-py312/bin/python -m pytest tests/unit -q -p no:cacheprovider $(PYTEST_ARGS)

## test: install everything, lint, and run every tier (unit, local, apiserver, cluster)
test: install-dev system-deps cluster-build lint
	$(PYTHON) -m pytest tests $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-py312
