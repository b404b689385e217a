#!/usr/bin/env bash
# Compiles every CUDA translation unit of csrc/cuda with `nvcc -c` for sm_80 and
# sm_90a (compile only, no GPU needed) and fails on any error or warning.  The flags
# are those torch's CUDAExtension adds (no implicit half conversions or operators,
# relaxed constexpr), so what passes here builds in setup.py too.  Run by
# `make cuda-check` and by CI when nvcc is present; NVCC=... picks the compiler, JOBS=...
# how many units compile at once (default 2); the objects go to a temporary directory.
set -euo pipefail
cd "$(dirname "$0")"
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
JOBS=${JOBS:-2}
if [ ! -x "$NVCC" ]; then
    echo "nvcc_check: nvcc not found (PATH or /usr/local/cuda/bin)" >&2
    exit 1
fi
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
flags=(-c -std=c++17 -O3 -Xcompiler -fPIC -Xcompiler -Wall -Werror all-warnings
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
       -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
       -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a -I..)
sources=(*.cu)
echo "nvcc_check: $("$NVCC" --version | tail -1); ${#sources[@]} translation units, $JOBS at a time"

compile() {  # one unit; its log goes to $build/<unit>.log
    local source=$1 start=$SECONDS
    if nice -n 10 "$NVCC" "${flags[@]}" "$source" -o "$build/${source%.cu}.o" > "$build/$source.log" 2>&1; then
        echo "nvcc_check: ok    $source ($((SECONDS - start)) s)"
    else
        echo "nvcc_check: FAIL  $source" >&2
        cat "$build/$source.log" >&2
        return 1
    fi
}

status=0
pids=()
for source in "${sources[@]}"; do
    compile "$source" &
    pids+=($!)
    if [ ${#pids[@]} -ge "$JOBS" ]; then
        wait "${pids[0]}" || status=1
        pids=("${pids[@]:1}")
    fi
done
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
exit $status
