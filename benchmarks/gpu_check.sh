#!/usr/bin/env bash
# The one-script GPU proof (../shared/design/GPU.md), run as `make gpu-check` on a machine
# with one H100/H200, Python 3.12, torch, triton, pybind11, ninja, pytest and
# pytest-benchmark preinstalled and no network.  Steps, each under its own `timeout`:
#   1. versions   nvidia-smi, python, torch, triton, nvcc
#   2. install    pip install --no-build-isolation --no-deps -e . (CUDA extension for sm_90 only);
#                 or, when $PREBUILT (default build/gpu-prebuilt, from `make gpu-prebuild` here,
#                 carried to the GPU machine) holds an extension whose stamp
#                 (csrc/cuda/extension_stamp.py: the sources, Python ABI, torch build and
#                 arch list) is this tree's with this python and torch, that extension, copied
#                 into fastattn/ with the package installed around it and nothing compiled
#   3. gpu tests  pytest -m gpu -n 8 -q (-x -q without pytest-xdist), TRITON_INTERPRET unset;
#                 each failing test is written to "$OUT/gpu-test-failures.txt" as it fails
#                 (tests/failure_log.py), so a run stopped by its timeout still names them all
#   4. crash backtraces  each test (at most 2) that crashed its xdist worker, by that file, rerun
#                 alone under cuda-gdb (run, bt, continue: the native backtrace, then faulthandler's
#                 Python one), or plainly with faulthandler where there is no cuda-gdb; a
#                 diagnostic, SKIP when no test crashed
#   5. memcheck   compute-sanitizer --tool memcheck over benchmarks/cuda_sanitize_cases.py, with
#                 torch's caching allocator off (PYTORCH_NO_CUDA_MEMORY_CACHING=1)
#   6. racecheck  compute-sanitizer --tool racecheck over the same cases
#   7. bench      fastattn bench --device cuda, full preset, float32 (bench.json, .csv, speedups.png in $OUT)
#   8. bench targets  fastattn bench --device cuda --preset gpu --dtype bfloat16: only the GPU
#                 targets of issues 4 and 6, at their shapes, each judged met or not
#                 (bench-targets.json, .csv, speedups-targets.png in $OUT)
#   9. profile    (only when STEPS names it) fastattn profile --preset gpu --dtype bfloat16 over
#                 PROFILE_CASES (CASE=BACKEND ...): each case's ops and kernels, by device time,
#                 under torch.profiler (in the log; the traces go to a temporary folder): which
#                 kernels a target's time goes to, e.g. whether an LSTM layer ran its
#                 persistent kernel or a GEMM and a pointwise kernel per step
# Alongside steps 3-6, in the background: Triton's cache warmed for the gpu tests and the
# benches (what their launches compile, in the order they run: the gpu tests' (every config
# the prune keeps for the one test that tunes), then the benches', about 200 compiles; and
# under triton 3.6 each kernel signature's C launcher, 17 gcc compiles), TRITON_WARMUP_JOBS
# at a time, by benchmarks/triton_compile_check.py --gpu-check into the cache Triton's JIT
# reads, where the tests and benches find them instead of compiling each one serially
# inside their time limits ("$OUT/triton-warmup.txt"); not a step: it cannot fail the check.
# Each step prints PASS/FAIL (or SKIP, with the reason) and the script goes on after a
# failure; everything printed goes to "$OUT/log.txt" (OUT defaults to
# benchmarks/results/latest).  Exit status: the number of failed steps (0: all passed).
# The timeouts of the default steps add up to 600 s, past GPU.md's 7 minutes: they are what the steps took on an
# H200 machine (2026-12-04, benchmarks/results/2026-12-04-h200) with some room.  The install
# (sm_90 alone, 16 jobs: about the slowest translation unit plus the link) took 114 s once and
# over 115 + 143 s another time; the 592 gpu tests need about 100 s on 8 xdist workers (run
# serially with -x, the first failure stopped them at the 22nd); memcheck took 16 s, racecheck
# 24 s, the full bench 79 s; the targets bench (26 small cases, one compiled graph, two CUDA
# graph captures) finished 24 cases in 60 s.  The crash reruns, not measured yet, get 40 s
# (cuda-gdb reads the symbols of torch's libraries), taken from memcheck's and the targets'
# room.  Both benches rewrite their JSON and CSV after every case, so a bench stopped by its
# timeout keeps the cases it finished (the report says how many of how many).  Each timeout
# can be changed through its variable below.  The profile step, run only when named, has 150 s
# for its 9 cases (each a fresh process: imports, build, warm-up, 5 profiled calls).
# STEPS picks the steps to run (default all but profile: "versions install tests crashes memcheck
# racecheck bench targets"), to rerun the ones a fix concerns within a short device lease.  GPU_TEST_FLAGS
# replaces the gpu tests' flags: "-n 8 -q" where pytest-xdist is installed (a test that
# crashes its worker does not end the run, and every failure shows), else "-x -q".
# PYTHON picks the interpreter; BENCH_FLAGS adds flags to the full bench (the torch.compile'd
# reference is left out by default: compiling ~30 graphs would not fit in the time);
# BENCH_TARGETS_FLAGS to the targets bench (whose one compiled peer, the additive target's,
# is on by default).
set -u -o pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-benchmarks/results/latest}"
FAILURE_LOG="$OUT/gpu-test-failures.txt"
PYTHON="${PYTHON:-python3}"  # the GPU machine's interpreter with torch is python3
SANITIZE_CASES="${SANITIZE_CASES:-benchmarks/cuda_sanitize_cases.py}"
PREBUILT="${PREBUILT:-build/gpu-prebuilt}"
ARCH_LIST=9.0  # this card's, the build's and the stamp's (make gpu-prebuild builds for it too)
BENCH_FLAGS="${BENCH_FLAGS:---no-compile}"
BENCH_TARGETS_FLAGS="${BENCH_TARGETS_FLAGS:-}"
STEPS=" ${STEPS:-versions install tests crashes memcheck racecheck bench targets} "
TIMEOUT_VERSIONS="${TIMEOUT_VERSIONS:-15}"
TIMEOUT_INSTALL="${TIMEOUT_INSTALL:-200}"
TIMEOUT_TESTS="${TIMEOUT_TESTS:-120}"
TIMEOUT_CRASHES="${TIMEOUT_CRASHES:-40}"
TIMEOUT_MEMCHECK="${TIMEOUT_MEMCHECK:-25}"
TIMEOUT_RACECHECK="${TIMEOUT_RACECHECK:-35}"
TIMEOUT_BENCH="${TIMEOUT_BENCH:-80}"
TIMEOUT_BENCH_TARGETS="${TIMEOUT_BENCH_TARGETS:-85}"
TIMEOUT_PROFILE="${TIMEOUT_PROFILE:-150}"
PROFILE_CASES="${PROFILE_CASES:-lstm_layer.t100_b64_h1024.forward=cuda lstm_layer.t100_b64_h1024.forward=triton \
lstm_cell.b64_h1024.forward=triton lstm_cell.b64_h1024.forward=cuda attention.dot.decode_step.b64_s4096_d512.forward=cuda \
attention.dot.decode_step.b64_s4096_d512.forward=triton attention.additive.multi_query.b16_t512_s512_d128.forward=triton \
attention.scaled_dot.multi_query.b64_t512_s512_d64.forward_backward=cuda greedy_decoding.cuda_graph.batch_64.forward=cuda}"
TRITON_WARMUP_JOBS="${TRITON_WARMUP_JOBS:-12}"  # of 16 cores: the tests' own JIT keeps the rest
TRITON_WARMUP_SECONDS="${TRITON_WARMUP_SECONDS:-100}"  # it starts no compile later than this
if [ -z "${GPU_TEST_FLAGS:-}" ]; then
    GPU_TEST_FLAGS="-x -q"
    "$PYTHON" -c "import xdist" 2>/dev/null && GPU_TEST_FLAGS="-n 8 -q"
fi
export PATH="$PATH:/usr/local/cuda/bin"  # nvcc and compute-sanitizer, when not on PATH already
unset TRITON_INTERPRET  # the GPU tests must run the compiled Triton kernels
# No Triton autotuning by default: tuning compiles every config of every kernel for every
# size bucket, which the time limits above cannot hold (fastattn/ops/triton_launch.py);
# FASTATTN_TRITON_AUTOTUNE=1 turns it on.  The test of the tuning itself turns it on.
export FASTATTN_TRITON_AUTOTUNE="${FASTATTN_TRITON_AUTOTUNE:-0}"
mkdir -p "$OUT"

failures=0

wanted() { [[ "$STEPS" == *" $1 "* ]]; }  # wanted STEP: whether STEPS names it

# step NAME TIMEOUT_SECONDS COMMAND...: runs COMMAND, prints PASS or FAIL with the reason.
step() {
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (timeout ${limit} s): $*"
    local started=$SECONDS status
    timeout --kill-after=5 "$limit" "$@"
    status=$?
    local took=$((SECONDS - started))
    if [ "$status" -eq 0 ]; then
        echo "PASS: $name (${took} s)"
    elif [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        echo "FAIL: $name (timed out after ${limit} s)"
        failures=$((failures + 1))
    else
        echo "FAIL: $name (exit status $status after ${took} s)"
        failures=$((failures + 1))
    fi
}

versions() {
    nvidia-smi || return 1
    "$PYTHON" --version || return 1
    "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| triton', triton.__version__)" || return 1
    nvcc --version || echo "nvcc: not found (the CUDA extension cannot be built)"
}

# install_fastattn: the editable install, compiling the extension for this card, or with the
# prebuilt one of $PREBUILT when its stamp is this tree's here (none compiled: minutes of a lease).
# shellcheck disable=SC2317  # run through `bash -c`, under the step's timeout
install_fastattn() {
    local here built=""
    here=$("$PYTHON" csrc/cuda/extension_stamp.py --arch-list "$ARCH_LIST") || return 1
    [ -f "$PREBUILT/stamp.txt" ] && built=$(cat "$PREBUILT/stamp.txt")
    if [ -n "$built" ] && [ "$built" = "$here" ]; then
        echo "the prebuilt extension of $PREBUILT ($here): installed without compiling"
        cp "$PREBUILT"/_C.*.so fastattn/ || return 1
        FASTATTN_SKIP_EXTENSION=1 "$PYTHON" -m pip install --no-build-isolation --no-deps -e . || return 1
        "$PYTHON" -c "import fastattn; built = fastattn.info()['extension']['backends'];
assert 'cuda' in built, f'the prebuilt extension has no CUDA kernels: {built}'" || return 1
        return 0
    fi
    [ -n "$built" ] && echo "the prebuilt extension of $PREBUILT is another tree's ($built; here: $here): compiling"
    env TORCH_CUDA_ARCH_LIST="$ARCH_LIST" MAX_JOBS=16 "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
}

sanitize() {  # sanitize TOOL: one compute-sanitizer step, or SKIP when it cannot run
    local tool=$1
    if [ ! -f "$SANITIZE_CASES" ]; then
        echo
        echo "SKIP: $tool ($SANITIZE_CASES is missing: no CUDA kernel cases to sanitize)"
        return
    fi
    if ! command -v compute-sanitizer >/dev/null; then
        echo
        echo "FAIL: $tool (compute-sanitizer not found on PATH or in /usr/local/cuda/bin)"
        failures=$((failures + 1))
        return
    fi
    local timeout_variable="TIMEOUT_${tool^^}"
    # memcheck sees only accesses outside a cudaMalloc'd block: torch's caching allocator packs
    # the cases' small tensors into shared 2 MB segments, where an overrun stays unseen, so it
    # runs uncached (each tensor its own cudaMalloc).  racecheck needs no such thing.
    # (Unset for racecheck: some torch versions read any value of the variable as "uncached".)
    local uncached=()
    [ "$tool" = memcheck ] && uncached=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1)
    step "$tool" "${!timeout_variable}" "${uncached[@]}" \
        compute-sanitizer --tool "$tool" --error-exitcode 1 "$PYTHON" "$SANITIZE_CASES"
}

# crashed_tests: the node ids of the tests (at most 2) that the failure log says crashed their
# worker; none without a log (STEPS without the tests, and no log left from a run before).
crashed_tests() {
    awk -F '\t' '$3 ~ /^worker crashed/ { print $1 }' "$FAILURE_LOG" 2>/dev/null | head -n 2
}

# rerun_crashed: each crashed test alone in a fresh process.  Under cuda-gdb the crash stops it
# for `bt`; `continue` then lets faulthandler print the Python stack; `info program` says how
# it ended and, never failing, leaves gdb's exit status the test's (-return-child-result).
# shellcheck disable=SC2317  # run through `bash -c`, under the step's timeout
rerun_crashed() {
    local debugger=() python=$PYTHON nodeid status=0
    if command -v cuda-gdb >/dev/null; then
        debugger=(cuda-gdb -batch -return-child-result -ex run -ex bt -ex continue -ex "info program" --args)
        python=$("$PYTHON" -c 'import sys; print(sys.executable)')  # gdb needs the binary, not a wrapper
    fi
    while IFS= read -r nodeid; do
        echo "--- $nodeid"
        "${debugger[@]}" "$python" -X faulthandler -m pytest -x -q -p no:cacheprovider "$nodeid" || status=1
    done < <(crashed_tests)
    return "$status"
}

crash_backtraces() {  # the crashes step, or SKIP when no gpu test crashed its worker
    if [ -z "$(crashed_tests)" ]; then
        echo
        echo "SKIP: crash backtraces (no test crashed its worker: $FAILURE_LOG names none)"
        return
    fi
    step "crash backtraces" "$TIMEOUT_CRASHES" bash -c rerun_crashed
}

# profile_cases: each CASE=BACKEND of PROFILE_CASES under `fastattn profile`, its table in the log.
# shellcheck disable=SC2317  # run through `bash -c`, under the step's timeout
profile_cases() {
    local entry traces status=0
    traces=$(mktemp -d)
    for entry in $PROFILE_CASES; do
        echo "--- ${entry%=*} on backend ${entry#*=}"
        "$PYTHON" -m fastattn profile "${entry%=*}" --preset gpu --dtype bfloat16 --backend "${entry#*=}" \
            --iterations 5 --trace "$traces/${entry%=*}.${entry#*=}.json" || status=1
    done
    rm -rf "$traces"
    return "$status"
}

export -f versions install_fastattn crashed_tests rerun_crashed profile_cases
export PYTHON PREBUILT ARCH_LIST FAILURE_LOG PROFILE_CASES

main() {
    echo "fastattn GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), output in $OUT, FASTATTN_TRITON_AUTOTUNE=$FASTATTN_TRITON_AUTOTUNE, steps:$STEPS"
    wanted versions && step versions "$TIMEOUT_VERSIONS" bash -c versions
    wanted install && step install "$TIMEOUT_INSTALL" bash -c install_fastattn
    local warmup=""
    if wanted tests || wanted bench || wanted targets; then
        timeout --kill-after=5 $((TRITON_WARMUP_SECONDS + 30)) "$PYTHON" benchmarks/triton_compile_check.py --gpu-check \
            --jobs "$TRITON_WARMUP_JOBS" --seconds "$TRITON_WARMUP_SECONDS" > "$OUT/triton-warmup.txt" 2>&1 &
        warmup=$!
    fi
    if wanted tests; then
        : > "$FAILURE_LOG"
        # shellcheck disable=SC2086  # GPU_TEST_FLAGS is a list of flags
        step "gpu tests" "$TIMEOUT_TESTS" env FASTATTN_FAILURE_LOG="$FAILURE_LOG" "$PYTHON" -m pytest -m gpu $GPU_TEST_FLAGS
        # In the log too: pytest's own summary (-ra in pyproject.toml) is lost when the step times out.
        if [ -s "$FAILURE_LOG" ]; then
            echo "failing gpu tests ($FAILURE_LOG: node id, phase, reason):"
            cat "$FAILURE_LOG"
        fi
    fi
    wanted crashes && crash_backtraces
    wanted memcheck && sanitize memcheck
    wanted racecheck && sanitize racecheck
    if [ -n "$warmup" ]; then
        wait "$warmup"
        local warmup_status=$?
        echo
        echo "triton warm-up (exit status $warmup_status): $(tail -n 1 "$OUT/triton-warmup.txt")"
    fi
    # shellcheck disable=SC2086  # BENCH_FLAGS is a list of flags
    wanted bench && step bench "$TIMEOUT_BENCH" "$PYTHON" -m fastattn bench --device cuda $BENCH_FLAGS \
        --json "$OUT/bench.json" --csv "$OUT/bench.csv" --plot "$OUT/speedups.png"
    # shellcheck disable=SC2086  # BENCH_TARGETS_FLAGS is a list of flags
    wanted targets && step "bench targets" "$TIMEOUT_BENCH_TARGETS" "$PYTHON" -m fastattn bench --device cuda --preset gpu \
        --dtype bfloat16 $BENCH_TARGETS_FLAGS \
        --json "$OUT/bench-targets.json" --csv "$OUT/bench-targets.csv" --plot "$OUT/speedups-targets.png"
    wanted profile && step profile "$TIMEOUT_PROFILE" bash -c profile_cases
    echo
    if [ "$failures" -eq 0 ]; then
        echo "GPU check: every step passed"
    else
        echo "GPU check: $failures step(s) failed"
    fi
    return "$failures"
}

main 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
