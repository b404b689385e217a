#!/usr/bin/env bash
# Compiles every CUDA translation unit of csrc/cuda with `nvcc -c` for sm_80 and
# sm_90a (compile only, no GPU needed) and fails on any error.  Run by `make cuda-check`
# and by CI when nvcc is present.  NVCC=... picks the compiler; the objects go to a
# temporary directory.
set -euo pipefail
cd "$(dirname "$0")"
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then
    echo "nvcc_check: nvcc not found (PATH or /usr/local/cuda/bin)" >&2
    exit 1
fi
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
sources=(*.cu)
echo "nvcc_check: $("$NVCC" --version | tail -1); ${#sources[@]} translation units"
status=0
for source in "${sources[@]}"; do
    start=$SECONDS
    if nice -n 10 "$NVCC" -c -std=c++17 -O3 -Xcompiler -Wall -Werror all-warnings \
        -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a \
        -I.. "$source" -o "$build/${source%.cu}.o"; then
        echo "nvcc_check: ok    $source ($((SECONDS - start)) s)"
    else
        echo "nvcc_check: FAIL  $source" >&2
        status=1
    fi
done
exit $status
