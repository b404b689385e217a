#!/usr/bin/env bash
# Syntax-checks csrc/cuda/binding.cpp -- the torch binding of the CUDA kernels, which
# setup.py compiles only where torch has CUDA -- against the installed torch's headers and
# the CUDA toolkit's, so that a mistake in it never waits for a GPU machine.  A CPU build
# of torch lacks one generated header, c10/cuda/impl/cuda_cmake_macros.h (CMake's export
# macros of c10's CUDA library, nothing the binding uses), which gets an empty stand-in.
# `g++ -fsyntax-only -Wall -Werror`: nothing is generated or linked, so what the binding
# does at run time still needs the GPU tests.  Run by `make cuda-check` after
# nvcc_check.sh; PYTHON=... picks the interpreter whose torch is used.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
cuda_include=""
for candidate in "${CUDA_HOME:-/nonexistent}/include" "$(dirname "$NVCC")/../include" /usr/local/cuda/include; do
    if [ -f "$candidate/cuda_runtime_api.h" ]; then
        cuda_include=$candidate
        break
    fi
done
if [ -z "$cuda_include" ]; then
    echo "binding_check: no CUDA toolkit headers (CUDA_HOME, next to $NVCC, /usr/local/cuda)" >&2
    exit 1
fi
read -r -a torch_includes < <("$PYTHON" -c "import torch.utils.cpp_extension as e; print(' '.join(e.include_paths()))")
python_include=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
stand_ins=$(mktemp -d)
trap 'rm -rf "$stand_ins"' EXIT
mkdir -p "$stand_ins/c10/cuda/impl"
if [ ! -f "${torch_includes[0]}/c10/cuda/impl/cuda_cmake_macros.h" ]; then
    echo "#pragma once" > "$stand_ins/c10/cuda/impl/cuda_cmake_macros.h"
fi
flags=(-fsyntax-only -std=c++17 -Wall -Werror -Wno-unknown-pragmas -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C)
for include in "${torch_includes[@]}"; do flags+=(-isystem "$include"); done
flags+=(-isystem "$stand_ins" -isystem "$cuda_include" -isystem "$python_include" -Icsrc)
start=$SECONDS
if nice -n 10 g++ "${flags[@]}" csrc/cuda/binding.cpp; then
    echo "binding_check: ok    csrc/cuda/binding.cpp ($((SECONDS - start)) s, torch $("$PYTHON" -c 'import torch; print(torch.__version__)'))"
else
    echo "binding_check: FAIL  csrc/cuda/binding.cpp" >&2
    exit 1
fi
