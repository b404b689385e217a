"""benchmarks/gpu_check.sh run here against fake GPU tools: the steps, their flags, the
PASS/FAIL/SKIP lines, the timeouts, the log and the exit status (the real run needs a GPU)."""

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
SCRIPT = REPOSITORY / "benchmarks" / "gpu_check.sh"

FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $* | arch=${TORCH_CUDA_ARCH_LIST-unset} jobs=${MAX_JOBS-unset} interpret=${TRITON_INTERPRET-unset}" >> "$CALLS"
case "$*" in
    *"-m pytest -m gpu"*)
        [ -n "${FAKE_CRASHED:-}" ] && printf '%s\t???\tworker crashed (gw0)\n' "$FAKE_CRASHED" >> "$FASTATTN_FAILURE_LOG"
        exit "${FAKE_PYTEST_STATUS:-0}" ;;
    *"-X faulthandler -m pytest"*) sleep "${FAKE_RERUN_SECONDS:-0}"; exit "${FAKE_PYTEST_STATUS:-0}" ;;
    *"-m fastattn bench"*) sleep "${FAKE_BENCH_SECONDS:-0}" ;;
    *"-m fastattn profile ${FAKE_PROFILE_FAILS:-none} "*) exit 1 ;;
    "csrc/cuda/extension_stamp.py --arch-list 9.0") echo "${FAKE_STAMP:-}" ;;
    "-m pip install"*) echo "  skip-extension=${FASTATTN_SKIP_EXTENSION-unset}" >> "$CALLS" ;;
    "--version") echo "Python 3.12.0 (fake)" ;;
    "-c import xdist") exit "${FAKE_NO_XDIST:-0}" ;;
    "-c import sys; print(sys.executable)") echo "$0" ;;
    -c*) echo "torch 2.11 (fake) | triton 3.6 (fake)" ;;
esac
"""
FAKE_TOOL = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$CALLS"
"""
FAKE_SANITIZER = """#!/usr/bin/env bash
echo "$(basename "$0") $* | no_caching=${PYTORCH_NO_CUDA_MEMORY_CACHING-unset}" >> "$CALLS"
"""
FAKE_CUDA_GDB = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$CALLS"
while [ "$1" != --args ]; do shift; done
shift
exec "$@"
"""
CUDA_GDB_RUN = "cuda-gdb -batch -return-child-result -ex run -ex bt -ex continue -ex info program --args"
# Whether the script would find a real cuda-gdb: the tests of the rerun without one skip then.
CUDA_GDB_FOUND = shutil.which("cuda-gdb") is not None or Path("/usr/local/cuda/bin/cuda-gdb").exists()


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _run(tmp_path: Path, cuda_gdb: bool = True, script: Path = SCRIPT,
         **environment: str) -> tuple[subprocess.CompletedProcess, list[str], Path]:
    fakes = tmp_path / "bin"
    fakes.mkdir()
    python = _executable(fakes / "fake-python", FAKE_PYTHON)
    for tool in ("nvidia-smi", "nvcc"):
        _executable(fakes / tool, FAKE_TOOL)
    _executable(fakes / "compute-sanitizer", FAKE_SANITIZER)
    if cuda_gdb:
        _executable(fakes / "cuda-gdb", FAKE_CUDA_GDB)
    calls, out = tmp_path / "calls.txt", tmp_path / "out"
    cases = _executable(tmp_path / "cases.py", "")
    env = {
        **os.environ, "PATH": f"{fakes}:{os.environ['PATH']}", "PYTHON": str(python), "CALLS": str(calls),
        "OUT": str(out), "SANITIZE_CASES": str(cases), "TRITON_INTERPRET": "1", **environment,
    }
    completed = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    return completed, calls.read_text().splitlines() if calls.exists() else [], out


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_every_step_runs_with_the_flags_of_gpu_md(tmp_path):
    completed, calls, out = _run(tmp_path)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    log = (out / "log.txt").read_text()
    assert log == completed.stdout
    for name in ("versions", "install", "gpu tests", "memcheck", "racecheck", "bench", "bench targets"):
        assert f"PASS: {name} (" in log
    assert f"SKIP: crash backtraces (no test crashed its worker: {out}/gpu-test-failures.txt names none)" in log
    assert "every step passed" in log
    python = str(tmp_path / "bin" / "fake-python")
    assert calls[0].startswith("python -c import xdist") and calls[1] == "nvidia-smi "
    assert "python -m pip install --no-build-isolation --no-deps -e . | arch=9.0 jobs=16 interpret=unset" in calls
    # With pytest-xdist, on 8 workers: a crashing test ends its worker only, and every failure shows.
    assert "python -m pytest -m gpu -n 8 -q | arch=unset jobs=unset interpret=unset" in calls
    assert (out / "gpu-test-failures.txt").read_text() == ""  # written by tests/failure_log.py, none here
    # Triton's cache warmed in the background for the gpu tests and benches, reported but never a step.
    assert ("python benchmarks/triton_compile_check.py --gpu-check --jobs 12 --seconds 100 "
            "| arch=unset jobs=unset interpret=unset") in calls
    assert "triton warm-up (exit status 0): " in log
    # memcheck without torch's caching allocator, whose shared segments hide overruns; racecheck with it.
    assert f"compute-sanitizer --tool memcheck --error-exitcode 1 {python} {tmp_path / 'cases.py'} | no_caching=1" in calls
    assert f"compute-sanitizer --tool racecheck --error-exitcode 1 {python} {tmp_path / 'cases.py'} | no_caching=unset" in calls
    bench = [call for call in calls if "-m fastattn bench" in call]
    assert bench == [
        f"python -m fastattn bench --device cuda --no-compile --json {out}/bench.json --csv {out}/bench.csv "
        f"--plot {out}/speedups.png | arch=unset jobs=unset interpret=unset",
        f"python -m fastattn bench --device cuda --preset gpu --dtype bfloat16 --json {out}/bench-targets.json "
        f"--csv {out}/bench-targets.csv --plot {out}/speedups-targets.png | arch=unset jobs=unset interpret=unset",
    ]


def test_without_python_set_every_step_runs_python3(tmp_path):
    """The GPU machine's interpreter with torch is python3 (a plain "python" need not exist
    there); `make gpu-check` passes the Makefile's PYTHON, whose default is python3 too."""
    fakes = tmp_path / "bin"
    fakes.mkdir()
    _executable(fakes / "python3", FAKE_PYTHON.replace('echo "python $*', 'echo "$(basename "$0") $*'))
    for tool in ("nvidia-smi", "nvcc"):
        _executable(fakes / tool, FAKE_TOOL)
    _executable(fakes / "compute-sanitizer", FAKE_SANITIZER)
    calls = tmp_path / "calls.txt"
    # Neither PYTHON nor the make variables of an enclosing `make test` (MAKELEVEL would make
    # make -n print its "Entering directory" lines).
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHON", "MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    env.update(PATH=f"{fakes}:/usr/bin:/bin", CALLS=str(calls), OUT=str(tmp_path / "out"),
               SANITIZE_CASES=str(_executable(tmp_path / "cases.py", "")))
    completed = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert any(call.startswith("python3 -m pip install") for call in calls.read_text().splitlines())
    recipe = subprocess.run(["make", "-n", "gpu-check"], cwd=REPOSITORY, env=env, capture_output=True, text=True, check=True).stdout
    assert recipe.strip() == "PYTHON=python3 bash benchmarks/gpu_check.sh"


def _tree_with_a_prebuilt_extension(tmp_path: Path, stamp: str) -> tuple[Path, Path]:
    """A copy of the script in a tree of its own (the install step copies into its fastattn/)
    and a PREBUILT folder as `make gpu-prebuild` leaves it: (the script, the folder)."""
    tree, prebuilt = tmp_path / "tree", tmp_path / "prebuilt"
    (tree / "benchmarks").mkdir(parents=True)
    (tree / "fastattn").mkdir()
    script = tree / "benchmarks" / "gpu_check.sh"
    shutil.copy(SCRIPT, script)
    prebuilt.mkdir()
    (prebuilt / "_C.cpython-312-x86_64-linux-gnu.so").write_bytes(b"the prebuilt binary")
    (prebuilt / "stamp.txt").write_text(stamp + "\n")
    return script, prebuilt


def test_a_prebuilt_extension_whose_stamp_is_the_trees_is_installed_without_compiling(tmp_path):
    """The lease's minutes go to the GPU, not to nvcc: the extension `make gpu-prebuild` built
    here for this tree, Python and torch is copied into the package, which pip installs around
    it with the build switched off; then fastattn must load it with its CUDA kernels."""
    script, prebuilt = _tree_with_a_prebuilt_extension(tmp_path, "sources abc | cpython-312 | torch 2.11.0+cu130")
    completed, calls, out = _run(tmp_path, script=script, STEPS="install", PREBUILT=str(prebuilt),
                                 FAKE_STAMP="sources abc | cpython-312 | torch 2.11.0+cu130")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    log = (out / "log.txt").read_text()
    assert "installed without compiling" in log and "PASS: install (" in log
    installed = script.parents[1] / "fastattn" / "_C.cpython-312-x86_64-linux-gnu.so"
    assert installed.read_bytes() == b"the prebuilt binary"
    pip = calls.index("python -m pip install --no-build-isolation --no-deps -e . | arch=unset jobs=unset interpret=unset")
    assert calls[pip + 1] == "  skip-extension=1"
    check = "\n".join(calls[pip + 2:])  # then fastattn must report the CUDA kernels it loaded
    assert check.startswith("python -c import fastattn;") and "assert 'cuda' in built" in check
    assert not any("arch=9.0" in call for call in calls)


def test_a_prebuilt_extension_of_another_tree_is_not_installed_the_install_compiles(tmp_path):
    script, prebuilt = _tree_with_a_prebuilt_extension(tmp_path, "sources abc | cpython-312 | torch 2.11.0+cu130")
    completed, calls, out = _run(tmp_path, script=script, STEPS="install", PREBUILT=str(prebuilt),
                                 FAKE_STAMP="sources def | cpython-312 | torch 2.11.0+cu130")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    log = (out / "log.txt").read_text()
    assert (f"the prebuilt extension of {prebuilt} is another tree's (sources abc | cpython-312 | torch 2.11.0+cu130; "
            "here: sources def | cpython-312 | torch 2.11.0+cu130): compiling") in log
    pip = calls.index("python -m pip install --no-build-isolation --no-deps -e . | arch=9.0 jobs=16 interpret=unset")
    assert calls[pip + 1] == "  skip-extension=unset"
    assert not (script.parents[1] / "fastattn" / "_C.cpython-312-x86_64-linux-gnu.so").exists()


def test_the_timeouts_add_up_to_the_stated_total_and_leave_a_lease_room_for_a_rerun():
    """GPU.md asks for under 7 minutes; the H200 run of 2026-12-04 measured an install of 114 s
    to over 258 s and about 100 s of gpu tests on 8 workers, so the timeouts add up to 600 s
    (with the crash reruns' 40 s), which the script's header states.  A 15-minute device lease
    still holds the machine's start and a rerun of a step or two (STEPS)."""
    script = SCRIPT.read_text()
    defaults = dict(re.findall(r'^TIMEOUT_(\w+)="\$\{TIMEOUT_\w+:-(\d+)\}"$', script, flags=re.MULTILINE))
    assert len(defaults) == 9  # one per step
    profile = int(defaults.pop("PROFILE"))  # not a default step
    total = sum(map(int, defaults.values()))
    assert f"The timeouts of the default steps add up to {total} s" in script
    assert f"The profile step, run only when named, has {profile} s" in script
    assert total <= 10 * 60


def test_bench_flags_reach_their_own_bench_step(tmp_path):
    completed, calls, out = _run(tmp_path, BENCH_FLAGS="--compile", BENCH_TARGETS_FLAGS="--no-compile --no-memory")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    full, targets = [call for call in calls if "-m fastattn bench" in call]
    assert full.startswith("python -m fastattn bench --device cuda --compile --json")
    assert "--preset gpu --dtype bfloat16 --no-compile --no-memory --json" in targets


def test_failures_are_reported_and_the_script_goes_on(tmp_path):
    completed, calls, out = _run(
        tmp_path, FAKE_PYTEST_STATUS="3", SANITIZE_CASES=str(tmp_path / "missing.py"),
        TIMEOUT_BENCH="1", TIMEOUT_BENCH_TARGETS="1", FAKE_BENCH_SECONDS="10",
    )
    log = (out / "log.txt").read_text()
    assert "FAIL: gpu tests (exit status 3" in log
    assert f"SKIP: memcheck ({tmp_path / 'missing.py'} is missing" in log
    assert "SKIP: racecheck (" in log
    assert "FAIL: bench (timed out after 1 s)" in log
    assert "FAIL: bench targets (timed out after 1 s)" in log
    assert "PASS: install (" in log and "3 step(s) failed" in log
    assert completed.returncode == 3
    assert not any(call.startswith("compute-sanitizer") for call in calls)


@pytest.mark.skipif(Path("/usr/local/cuda/bin/compute-sanitizer").exists(), reason="the script finds the real one")
def test_missing_compute_sanitizer_is_a_failure(tmp_path):
    fakes = tmp_path / "bin"
    completed, _, out = _run(tmp_path, TIMEOUT_MEMCHECK="5")
    assert completed.returncode == 0  # present in the first run: the sanity check for the next one
    (fakes / "compute-sanitizer").unlink()
    (tmp_path / "calls.txt").unlink()
    env = {**os.environ, "PATH": f"{fakes}:/usr/bin:/bin", "PYTHON": str(fakes / "fake-python"),
           "CALLS": str(tmp_path / "calls.txt"), "OUT": str(out), "SANITIZE_CASES": str(tmp_path / "cases.py")}
    second = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert "FAIL: memcheck (compute-sanitizer not found" in second.stdout
    assert second.returncode == 2


def test_ncu_script_profiles_the_nvtx_range_of_fastattn_profile(tmp_path):
    from fastattn.profile import NVTX_RANGE

    fakes = tmp_path / "bin"
    fakes.mkdir()
    ncu = _executable(fakes / "ncu", FAKE_TOOL)
    env = {**os.environ, "NCU": str(ncu), "PYTHON": "python3", "CALLS": str(tmp_path / "calls.txt"),
           "OUT": str(tmp_path / "out"), "KERNEL": "attention_.*"}
    script = REPOSITORY / "benchmarks" / "ncu.sh"
    completed = subprocess.run(["bash", str(script), "lstm_cell.forward", "--backend", "cuda"],
                               env=env, capture_output=True, text=True, timeout=30)
    assert completed.returncode == 0, completed.stderr
    profile_run, show = (tmp_path / "calls.txt").read_text().splitlines()
    report = tmp_path / "out" / "ncu-lstm_cell.forward"
    assert profile_run == (
        f"ncu --nvtx --nvtx-include {NVTX_RANGE}/ --section SpeedOfLight --section MemoryWorkloadAnalysis "
        f"--section ComputeWorkloadAnalysis --launch-count 10 --kernel-name regex:attention_.* "
        f"--force-overwrite --export {report} python3 -m fastattn profile lstm_cell.forward --device cuda "
        f"--iterations 1 --backend cuda"
    )
    assert show == f"ncu --import {report}.ncu-rep --page details"
    usage = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_steps_runs_only_the_named_steps_and_gpu_test_flags_replace_theirs(tmp_path):
    """A rerun within a short lease: STEPS names the steps a fix concerns (here no benches,
    no racecheck), GPU_TEST_FLAGS drops -x so one run shows every failing test."""
    completed, calls, out = _run(tmp_path, STEPS="install tests memcheck", GPU_TEST_FLAGS="-q")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    log = (out / "log.txt").read_text()
    assert [line for line in log.splitlines() if line.startswith(("PASS", "FAIL", "SKIP"))] == [
        line for line in log.splitlines() if line.startswith(("PASS: install", "PASS: gpu tests", "PASS: memcheck"))
    ]
    assert len([line for line in log.splitlines() if line.startswith("PASS")]) == 3
    assert "python -m pytest -m gpu -q | arch=unset jobs=unset interpret=unset" in calls
    assert not any(call.startswith(("nvidia-smi", "python -m fastattn bench")) or "racecheck" in call for call in calls)
    assert "triton warm-up (exit status 0): " in log  # the tests still find Triton's cache warmed


def test_the_profile_step_runs_only_when_named_once_per_case_and_backend(tmp_path):
    """Not a default step (the run above calls no `fastattn profile`); named, it profiles each
    CASE=BACKEND of PROFILE_CASES at the targets' preset and dtype, its traces outside OUT, and
    a case that fails fails the step while the others still run."""
    completed, calls, out = _run(tmp_path, STEPS="profile", PROFILE_CASES="first.case=cuda second.case=triton",
                                 FAKE_PROFILE_FAILS="first.case")
    assert completed.returncode == 1, completed.stdout + completed.stderr
    log = (out / "log.txt").read_text()
    assert "FAIL: profile (exit status 1 after" in log
    assert "--- first.case on backend cuda" in log and "--- second.case on backend triton" in log
    profiled = [call.split(" | ")[0] for call in calls if "-m fastattn profile" in call]
    assert [call.split(" --trace ")[0] for call in profiled] == [
        f"python -m fastattn profile {case} --preset gpu --dtype bfloat16 --backend {backend} --iterations 5"
        for case, backend in (("first.case", "cuda"), ("second.case", "triton"))
    ]
    assert all(not call.split(" --trace ")[1].startswith(str(out)) for call in profiled)
    assert sorted(path.name for path in out.iterdir()) == ["log.txt"]
    (tmp_path / "default").mkdir()
    _, default_calls, _ = _run(tmp_path / "default")
    assert default_calls and not any("-m fastattn profile" in call for call in default_calls)


def test_without_pytest_xdist_the_gpu_tests_stop_at_the_first_failure(tmp_path):
    completed, calls, _ = _run(tmp_path, FAKE_NO_XDIST="1")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "python -m pytest -m gpu -x -q | arch=unset jobs=unset interpret=unset" in calls


# The failure log (tests/failure_log.py) and the crash reruns that read it.

TINY_TESTS = '''
import ctypes

import pytest


@pytest.fixture
def broken():
    raise RuntimeError("the fixture broke")


def test_passes():
    pass


def test_errors_in_setup(broken):
    pass


def test_fails():
    assert 1 == 2


def test_segfaults():
    ctypes.string_at(0)  # reads address 0: SIGSEGV
'''


def _tiny_run(tmp_path: Path, *flags: str) -> list[list[str]]:
    """pytest over TINY_TESTS (in a fresh process, with the failure log registered as the repo's
    conftest.py registers it); the failure log's lines, split into their fields."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.failure_log"]\n')
    (tmp_path / "test_tiny.py").write_text(TINY_TESTS)
    log = tmp_path / "failures.txt"
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "FASTATTN_FAILURE_LOG": str(log)}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *flags],
                   cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert log.exists(), f"expected pytest to write the failure log {log}"
    return [line.split("\t") for line in log.read_text().splitlines()]


def test_the_repository_conftest_registers_the_failure_log(request):
    assert request.config.pluginmanager.has_plugin("tests.failure_log")


def test_the_failure_log_names_each_failing_test_with_its_phase_and_reason(tmp_path):
    lines = _tiny_run(tmp_path, "-k", "not segfaults")
    assert lines == [
        ["test_tiny.py::test_errors_in_setup", "setup", "RuntimeError: the fixture broke"],
        ["test_tiny.py::test_fails", "call", "assert 1 == 2"],
    ]


def test_under_xdist_a_test_that_crashes_its_worker_is_logged_once_by_the_controller(tmp_path):
    lines = sorted(_tiny_run(tmp_path, "-n", "2"))
    assert lines[:2] == [
        ["test_tiny.py::test_errors_in_setup", "setup", "RuntimeError: the fixture broke"],
        ["test_tiny.py::test_fails", "call", "assert 1 == 2"],
    ]
    assert len(lines) == 3, lines  # no line twice: the workers write none
    nodeid, phase, reason = lines[2]
    assert nodeid == "test_tiny.py::test_segfaults" and phase == "???"  # xdist cannot tell the phase
    assert re.fullmatch(r"worker crashed \(gw[01]\)", reason)


def _failure_log(out: Path, *lines: str) -> None:
    out.mkdir()
    (out / "gpu-test-failures.txt").write_text("".join(f"{line}\n" for line in lines))


@pytest.mark.parametrize("cuda_gdb", [
    True, pytest.param(False, marks=pytest.mark.skipif(CUDA_GDB_FOUND, reason="the script finds the real cuda-gdb")),
])
def test_the_crashes_step_reruns_a_test_that_crashed_its_worker_alone(tmp_path, cuda_gdb):
    (tmp_path / "test_tiny.py").write_text(TINY_TESTS)
    crashed = f"{tmp_path}/test_tiny.py::test_segfaults"
    _failure_log(tmp_path / "out", f"{tmp_path}/test_tiny.py::test_fails\tcall\tassert 1 == 2",
                 f"{crashed}\t???\tworker crashed (gw3)")
    completed, calls, out = _run(tmp_path, cuda_gdb=cuda_gdb, STEPS="crashes", PYTHON=sys.executable)
    log = (out / "log.txt").read_text()
    assert f"--- {crashed}\n" in log and "test_fails" not in log  # the crashed test alone
    assert "Fatal Python error: Segmentation fault" in log  # faulthandler's Python stack
    assert "FAIL: crash backtraces (exit status 1 after" in log and completed.returncode == 1
    rerun = f"{sys.executable} -X faulthandler -m pytest -x -q -p no:cacheprovider {crashed}"
    assert calls == ([f"{CUDA_GDB_RUN} {rerun}"] if cuda_gdb else [])


def test_the_crashes_step_is_skipped_when_no_test_crashed(tmp_path):
    _failure_log(tmp_path / "out", "tests/test_x.py::test_fails\tcall\tassert 1 == 2")
    completed, calls, out = _run(tmp_path, STEPS="crashes")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    skip = f"SKIP: crash backtraces (no test crashed its worker: {out}/gpu-test-failures.txt names none)"
    assert skip in completed.stdout
    assert not any("-m pytest" in call or call.startswith("cuda-gdb") for call in calls)


def test_the_gpu_tests_failure_log_feeds_the_crash_reruns_within_their_timeout(tmp_path):
    """The gpu tests step starts a fresh log, passes it to pytest, prints it; the crashes step
    reruns the crashed test (here a fake one that hangs) and stops at its own timeout."""
    crashed = "tests/test_x.py::test_y[a b]"
    _failure_log(tmp_path / "out", "tests/test_old.py::test_gone\t???\tworker crashed (gw1)")
    completed, calls, out = _run(tmp_path, STEPS="tests crashes", FAKE_CRASHED=crashed, FAKE_PYTEST_STATUS="1",
                                 FAKE_RERUN_SECONDS="30", TIMEOUT_CRASHES="1")
    log = (out / "log.txt").read_text()
    assert (out / "gpu-test-failures.txt").read_text() == f"{crashed}\t???\tworker crashed (gw0)\n"
    assert "FAIL: gpu tests (exit status 1 after" in log
    assert f"failing gpu tests ({out}/gpu-test-failures.txt: node id, phase, reason):\n{crashed}\t???\t" in log
    assert f"--- {crashed}\n" in log and "FAIL: crash backtraces (timed out after 1 s)" in log
    rerun = f"-X faulthandler -m pytest -x -q -p no:cacheprovider {crashed}"
    assert f"python {rerun} | arch=unset jobs=unset interpret=unset" in calls
    assert f"{CUDA_GDB_RUN} {tmp_path / 'bin' / 'fake-python'} {rerun}" in calls
    assert completed.returncode == 2
