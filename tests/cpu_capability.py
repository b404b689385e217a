"""A test script run in a Python process of its own under ATEN_CPU_CAPABILITY or
FASTATTN_CPU_LAYER_GEMM: the CPU kernels' instruction set (baseline, AVX2, AVX-512, AVX512-BF16) and
the engine of the LSTM/GRU layers' float32 GEMMs are picked once a process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_with_cpu_capability(script: str, capability: str) -> subprocess.CompletedProcess:
    """``python -c script`` from the repository root with ATEN_CPU_CAPABILITY=capability."""
    return run_with_environment(script, ATEN_CPU_CAPABILITY=capability)


def run_with_environment(script: str, **variables: str) -> subprocess.CompletedProcess:
    """``python -c script`` from the repository root with these environment variables set."""
    environment = {**os.environ, **variables}
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=600)
