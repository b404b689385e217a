#!/usr/bin/env bash
# The C++ CPU kernels (csrc/cpu, the autograd, autocast and decoder-step code) under
# AddressSanitizer and UndefinedBehaviorSanitizer: fastattn._C built with
# FASTATTN_SANITIZE=1 (setup.py: -O1 -g -fsanitize=address,undefined) in a copy of the tree,
# then the tests that call the CPU ops, run with the sanitizers' runtimes preloaded into
# Python, stopping at the first report (an out-of-bounds read or write, a use after free,
# a signed overflow, a misaligned or null access).  EMULATION=1 adds the CUDA kernels'
# CPU emulation (tests/test_cuda_kernels.py -k emulated, built the same way), which
# compute-sanitizer can only check on a GPU.  Two cores: 4 minutes (2.7 of them the
# build), about 17 more with EMULATION=1.  Needs g++ with libasan and libubsan; not run
# by CI (its time).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
runtimes=""
for library in libasan.so libubsan.so; do
    path=$(g++ -print-file-name=$library)
    if [ ! -f "$path" ]; then
        echo "sanitize_check: g++ has no $library" >&2
        exit 1
    fi
    runtimes=${runtimes:+$runtimes:}$path
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r setup.py pyproject.toml csrc fastattn kernels tests "$work"/
rm -f "$work"/fastattn/_C*.so
start=$SECONDS
(cd "$work" && FASTATTN_SANITIZE=1 MAX_JOBS=${MAX_JOBS:-2} nice -n 10 "$PYTHON" setup.py -q build_ext --inplace \
    > build.log 2>&1) || { tail -40 "$work/build.log" >&2; echo "sanitize_check: the build failed" >&2; exit 1; }
echo "sanitize_check: fastattn._C built with the sanitizers in $((SECONDS - start)) s"
tests=(tests/test_cpu_attention.py tests/test_cpu_attention_16_bit.py tests/test_cpu_attention_bfloat16_gemm.py
       tests/test_cpu_attention_values_are_keys.py
       tests/test_cpu_recurrent.py tests/test_attention_bad_inputs.py tests/test_attention_properties.py
       tests/test_decoder_step.py tests/test_hard_attention.py tests/test_cpu_hard_attention_outputs.py tests/test_autocast.py
       tests/test_higher_order_gradients.py tests/test_fake_kernels.py tests/test_front_end.py)
if [ "${EMULATION:-0}" = 1 ]; then
    tests+=(tests/test_cuda_kernels.py)
fi
cd "$work"
# Reports go to files (pytest captures a test's stderr, lost when the sanitizer aborts it),
# shown when a test fails and looked for after (a subprocess's report may not fail its test).
reports="$work/reports"
mkdir -p "$reports"
export FASTATTN_SANITIZE=1 PYTHONPATH="$work" LD_PRELOAD="$runtimes"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:detect_odr_violation=0:log_path=$reports/asan
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$reports/ubsan
"$PYTHON" -c "import fastattn._C as c, sys; sys.exit(0 if c.__file__.startswith('$work') else 'not the sanitized build: ' + c.__file__)"
status=0
"$PYTHON" -m pytest -q -x -p no:cacheprovider "${tests[@]}" || status=$?
if [ -n "$(ls -A "$reports")" ]; then
    cat "$reports"/* >&2
    echo "sanitize_check: FAIL, the sanitizers' reports are above" >&2
    exit 1
fi
if [ "$status" != 0 ]; then
    echo "sanitize_check: FAIL, tests failed (pytest exit $status) without a sanitizer report" >&2
    exit 1
fi
echo "sanitize_check: no sanitizer report ($((SECONDS - start)) s)"
