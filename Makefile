# `make demo` and `make test` create and reuse a project virtual environment (VENV, default .venv) and install
# into it only when setup.py is newer than the install stamp, so that repeated runs start at once.
#
#   make test                      # .venv in this checkout
#   make test VENV=~/venvs/tbg     # another (or an existing, activated) environment
#   make install                   # create / update the environment only
#
# torch is pinned here (not in setup.py) so that pip keeps the locally provided CPU build instead of downloading
# a multi-GB CUDA wheel. To use another build, install it into the environment first and set TORCH_VERSION to
# its version (e.g. `make install TORCH_VERSION=2.5.1`).

VENV ?= .venv
# Interpreter that creates the environment (Python >= 3.10).
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0

VENV_PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.openmm_tbg-installed

.PHONY: install test demo

install: $(STAMP)

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)

# Re-run pip only when setup.py changed since the last successful install (or the stamp is missing). In an
# environment that already has everything, pip only confirms that the requirements are met.
$(STAMP): setup.py | $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install torch==$(TORCH_VERSION)
	$(VENV_PYTHON) -m pip install -e ".[test]"
	@touch $@

test: $(STAMP)
	$(VENV_PYTHON) -m pytest tests -q

demo: $(STAMP)
	$(VENV_PYTHON) examples/sample_dipeptide.py
