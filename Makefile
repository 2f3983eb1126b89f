PYTHON ?= python

.PHONY: install test demo

# torch is pinned here (not in setup.py) so that pip keeps the locally installed CPU build instead of
# downloading a multi-GB CUDA wheel.
install:
	$(PYTHON) -m pip install torch==2.13.0 && $(PYTHON) -m pip install -e ".[test]"

test: install
	$(PYTHON) -m pytest tests -q

demo: install
	$(PYTHON) examples/sample_dipeptide.py --samples 32
