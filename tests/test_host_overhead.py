"""benchmarks/host_overhead.py on the CPU: a row per implementation of the case, with its
synced and host times, and the own-time table of fastattn's backends."""

import os
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
SCRIPT = REPOSITORY / "benchmarks" / "host_overhead.py"


def _run(*arguments: str) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, timeout=300,
                          env=environment, cwd=REPOSITORY)


def test_each_implementation_gets_its_times_and_the_backends_their_profile():
    completed = _run("--preset", "tiny", "--device", "cpu", "--dtype", "float32", "lstm_cell.forward")
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[0] == "lstm_cell.forward (cpu, float32)"
    rows = {line.split()[0]: line for line in lines[1:] if "synced" in line}
    assert {"reference", "cpu", "torch.nn.LSTMCell"} <= set(rows)
    for row in rows.values():
        fields = row.split()
        assert float(fields[fields.index("synced") + 1]) > 0 and float(fields[fields.index("host") + 1]) > 0
    profiled = [line for line in lines if " us own " in line]
    assert any("check_cell_inputs" in line for line in profiled)  # fastattn's own Python shows up


def test_an_unknown_case_is_refused_with_the_preset_cases():
    completed = _run("--preset", "tiny", "--device", "cpu", "no_such_case")
    assert completed.returncode == 2
    assert "unknown cases ['no_such_case']" in completed.stderr and "lstm_cell.forward" in completed.stderr


def test_the_triton_backend_python_is_timed_on_the_cpu_with_its_launches_stubbed():
    completed = _run("--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--stub-triton-launches",
                     "lstm_cell.forward")
    assert completed.returncode == 0, completed.stderr
    rows = {line.split()[0]: line for line in completed.stdout.splitlines() if "synced" in line}
    assert "triton" in rows  # the backend took the CPU tensors
    profiled = [line for line in completed.stdout.splitlines() if " us own " in line]
    assert any("triton_recurrent.py" in line for line in profiled)  # its body ran, up to the stubbed launch


def test_stubbed_triton_launches_are_refused_on_a_gpu_device():
    completed = _run("--device", "cuda", "--stub-triton-launches", "lstm_cell.b64_h1024.forward")
    assert completed.returncode == 2 and "--stub-triton-launches is for --device cpu" in completed.stderr
