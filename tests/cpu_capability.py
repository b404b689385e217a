"""A test script run in a Python process of its own under ATEN_CPU_CAPABILITY: the CPU
kernels' instruction set (baseline, AVX2, AVX512-BF16) is picked once a process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_with_cpu_capability(script: str, capability: str) -> subprocess.CompletedProcess:
    """``python -c script`` from the repository root with ATEN_CPU_CAPABILITY=capability."""
    environment = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=600)
