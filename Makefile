# The two set-up commands of the README: `make run` (the main job) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install run test bench

# torch==2.13.0 only when no torch is installed (a bare `torch` requirement would pull
# a multi-GB CUDA build); --no-build-isolation so pip builds against the torch present.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	@$(PYTHON) -c "import setuptools, wheel" 2>/dev/null || $(PIP) install setuptools wheel
	$(PIP) install --no-build-isolation -e ".[test]"

run: install
	$(PYTHON) -m fastattn bench --quick

test: install
	$(PYTHON) -m pytest -q
