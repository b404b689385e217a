# The two set-up commands of the README: `make run` (the main job) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install run test bench cuda-check sanitize-check gpu-versions-check gpu-prebuild gpu-check

# torch==2.13.0 only when no torch is installed (a bare `torch` requirement would pull
# a multi-GB CUDA build); --no-build-isolation so the C++ extension builds against the
# torch present.  MAX_JOBS bounds ninja's parallel compiles.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	@$(PYTHON) -c "import setuptools, wheel, pybind11, ninja" 2>/dev/null || $(PIP) install setuptools wheel pybind11 ninja
	MAX_JOBS=$${MAX_JOBS:-4} $(PIP) install --no-build-isolation -e ".[test]"

run: install
	$(PYTHON) -m fastattn bench --quick

# The whole suite, then the reference tests again with the C++ extension switched off
# (an install without it must keep working).  MALLOC_PERTURB_: glibc fills the memory it
# hands out with non-zero bytes, so that a kernel output left partly unwritten (at::empty)
# shows as wrong values every run, not as the zeros of fresh pages most runs.
test: install
	MALLOC_PERTURB_=165 $(PYTHON) -m pytest -q
	FASTATTN_SKIP_EXTENSION=1 $(PYTHON) -m pytest -q tests/test_reference_hand_computed.py \
		tests/test_reference_layouts.py tests/test_reference_gradcheck.py tests/test_backends.py

bench: install
	$(PYTHON) -m pytest benchmarks --benchmark-only

# Every CUDA translation unit compiled with nvcc for sm_80 and sm_90a (compile only: no GPU needed),
# then the torch binding syntax-checked against the installed torch's headers.
cuda-check:
	bash csrc/cuda/nvcc_check.sh
	PYTHON=$(PYTHON) bash csrc/cuda/binding_check.sh

# The CPU kernels under AddressSanitizer and UBSan (EMULATION=1: the CUDA kernels' CPU emulation
# too), built in a copy of the tree (csrc/sanitize_check.sh); not run by CI.
sanitize-check:
	PYTHON=$(PYTHON) bash csrc/sanitize_check.sh

# The GPU machine's torch (a CUDA build) and triton, without its GPU: the extension built with the
# CUDA kernels against them, then the test suite (csrc/cuda/gpu_versions_check.sh).
gpu-versions-check:
	PYTHON=$(PYTHON) bash csrc/cuda/gpu_versions_check.sh

# The extension for the GPU machine (Python 3.12, torch 2.11's CUDA build, sm_90), built here into
# build/gpu-prebuilt with its stamp: a device run that carries that folder has `make gpu-check`
# install it without compiling, when the stamp is the tree's (gpu_versions_check.sh, no tests).
GPU_PYTHON ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
	$$p -c "" 2>/dev/null && { echo $$p; break; }; done)
gpu-prebuild:
	@test -n "$(GPU_PYTHON)" || { echo "gpu-prebuild: no Python 3.12 found; set GPU_PYTHON"; exit 1; }
	PYTHON=$(GPU_PYTHON) VENV=$${VENV:-build/gpu-prebuild-venv} WORK=build/gpu-prebuild-tree \
		PREBUILT_OUT=build/gpu-prebuilt TESTS=0 bash csrc/cuda/gpu_versions_check.sh

# The one-script GPU proof (../shared/design/GPU.md), for a machine with a GPU.
gpu-check:
	PYTHON=$(PYTHON) bash benchmarks/gpu_check.sh
