#!/usr/bin/env bash
# The GPU machine's software, without its GPU: builds fastattn._C with the CUDA kernels against
# a CUDA build of torch 2.11 (the GPU machine's torch, which runs on the CPU too) and runs the
# test suite there with triton 3.6, so that what only that machine would show (the binding
# compiled and linked for real, the CUDA op registrations loaded, torch 2.11 / triton 3.6 API
# differences) shows here first.  The gpu-marked tests skip (no device); the Triton kernels run
# under the interpreter.  `make gpu-versions-check`; .ci/run runs it where nvcc is present.
#
# The environment goes to $VENV (default build/gpu-versions-venv, reused when present), the
# tree is copied to $WORK (default build/gpu-versions-tree) so that the checkout's own build of
# the extension is left alone.  When the CUDA build of torch cannot be downloaded (no registry),
# the check prints SKIP with pip's reason and exits 0; any other failure exits non-zero.
#
# With PREBUILT_OUT set, the built extension (its symbol table stripped) and its stamp
# (csrc/cuda/extension_stamp.py) go to that folder, which `make gpu-check` installs instead of
# compiling when the stamp it computes on the GPU machine is the same: `make gpu-prebuild`
# does this with PYTHON a Python 3.12 (the GPU machine's) and TESTS=0 (no test run).
set -euo pipefail
cd "$(dirname "$0")/../.."

TORCH_VERSION="${TORCH_VERSION:-2.11.0}"
TRITON_VERSION="${TRITON_VERSION:-3.6.0}"
VENV="${VENV:-build/gpu-versions-venv}"
WORK="${WORK:-build/gpu-versions-tree}"
PYTHON="${PYTHON:-python3}"
PREBUILT_OUT="${PREBUILT_OUT:-}"
TESTS="${TESTS:-1}"
ARCH_LIST=9.0  # the GPU machine's (gpu_check.sh builds for it alone)
VENV="$(realpath -m "$VENV")"
WORK="$(realpath -m "$WORK")"
if [ -n "$PREBUILT_OUT" ]; then
    PREBUILT_OUT="$(realpath -m "$PREBUILT_OUT")"
fi
export PATH="$PATH:/usr/local/cuda/bin"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# The GPU machine's image holds these (../.library's device notes); its torch and triton pinned.
# numpy below 2.4 here only: triton 3.6's interpreter (the tests' Triton runs, not the GPU's) turns
# one-element arrays into ints with int(), which numpy 2.4 refuses.
if ! "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" "numpy<2.4" tqdm pybind11 ninja \
        setuptools wheel pytest pytest-xdist hypothesis scipy pytest-benchmark matplotlib sacrebleu scikit-learn \
        > "$VENV/pip.log" 2>&1; then
    echo "gpu_versions_check: SKIP: could not install torch $TORCH_VERSION / triton $TRITON_VERSION:"
    grep -E "ERROR|error" "$VENV/pip.log" | tail -3
    exit 0
fi
"$VENV/bin/python" -c "import torch, triton; assert torch.version.cuda, 'not a CUDA build of torch';
print('gpu_versions_check: torch', torch.__version__, '(CUDA', torch.version.cuda + ') | triton', triton.__version__)"

rm -rf "$WORK"
mkdir -p "$WORK"
tar --exclude=./build --exclude=./.git --exclude='*.so' --exclude='*.egg-info' -cf - . | tar -xf - -C "$WORK"
cd "$WORK"
started=$SECONDS
TORCH_CUDA_ARCH_LIST=$ARCH_LIST MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/pip" install -q --no-build-isolation --no-deps -e . \
    > build.log 2>&1 || { tail -40 build.log; echo "gpu_versions_check: FAIL: the CUDA build failed"; exit 1; }
echo "gpu_versions_check: built with the CUDA kernels in $((SECONDS - started)) s"
"$VENV/bin/python" -c "import fastattn; built = fastattn.info()['extension']['backends'];
assert 'cuda' in built, f'the extension has no CUDA kernels: {built}'; print('gpu_versions_check: backends built', built)"
if [ -n "$PREBUILT_OUT" ]; then
    rm -rf "$PREBUILT_OUT"
    mkdir -p "$PREBUILT_OUT"
    strip --strip-unneeded -o "$PREBUILT_OUT/$(basename fastattn/_C.*.so)" fastattn/_C.*.so
    "$VENV/bin/python" csrc/cuda/extension_stamp.py --arch-list "$ARCH_LIST" > "$PREBUILT_OUT/stamp.txt"
    echo "gpu_versions_check: the extension for the GPU machine, in $PREBUILT_OUT:" \
        "$(du -h "$PREBUILT_OUT"/_C.*.so | cut -f1), $(cat "$PREBUILT_OUT/stamp.txt")"
fi
if [ "$TESTS" = 1 ]; then
    MALLOC_PERTURB_=165 "$VENV/bin/python" -m pytest -q -p no:cacheprovider  # as make test
fi
echo "gpu_versions_check: ok"
