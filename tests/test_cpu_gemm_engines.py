"""The engine of the LSTM/GRU layers' float32 GEMMs (csrc/cpu/tile_gemm.h): the BLAS's
sgemm or ATen's brgemm ukernel, set once a process by FASTATTN_CPU_LAYER_GEMM, else by the
CPU's vendor (on Intel CPUs the BLAS for layers of large steps).  Each engine, forced, runs
the float32 layers against the reference in a process of its own; the attention's tiles
stay on brgemm either way."""

from pathlib import Path

import pytest

from fastattn import backends
from tests.cpu_capability import run_with_environment

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("cpu") is not None, reason=str(backends.unavailable_reason("cpu"))
)

PRINT_KERNELS = "import fastattn; print(','.join(fastattn.info()['cpu_kernels']))"


def cpu_vendor():
    """The vendor_id /proc/cpuinfo gives ("" where it gives none), or None without the file."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")), "")


def tile_engine(**variables):
    result = run_with_environment(PRINT_KERNELS, **variables)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().split(",")[-1]


def test_the_layer_gemms_run_on_the_blas_for_large_steps_on_intel_cpus_and_on_brgemm_elsewhere():
    vendor = cpu_vendor()
    if vendor is None:
        pytest.skip("no /proc/cpuinfo to check the CPU's vendor against")
    expected = "layer_gemm_blas_for_large_steps" if vendor == "GenuineIntel" else "layer_gemm_brgemm"
    assert tile_engine(FASTATTN_CPU_LAYER_GEMM="") == expected


@pytest.mark.parametrize("engine", ["blas", "brgemm"])
def test_fastattn_cpu_layer_gemm_picks_the_engine(engine):
    assert tile_engine(FASTATTN_CPU_LAYER_GEMM=engine) == f"layer_gemm_{engine}"


def test_an_unknown_fastattn_cpu_layer_gemm_is_refused_by_name():
    script = ("import torch, fastattn\n"
              "for call in (fastattn.info, lambda: fastattn.nn.LSTM(3, 5)(torch.randn(6, 2, 3))):\n"
              "    try:\n"
              "        call()\n"
              "    except (ValueError, RuntimeError) as error:\n"
              "        print(type(error).__name__, error)\n")
    result = run_with_environment(script, FASTATTN_CPU_LAYER_GEMM="mkl")
    assert result.returncode == 0, result.stderr[-3000:]
    refusals = result.stdout.strip().splitlines()
    assert len(refusals) == 2, result.stdout
    for refusal in refusals:
        assert 'FASTATTN_CPU_LAYER_GEMM must be "blas" or "brgemm" (or unset), got "mkl"' in refusal


CHECK_FLOAT32_KERNELS = """
import torch
import fastattn
from tests.test_cpu_attention import (SMALL_MATRIX_SHAPES, check_float32_matrix_multiply_path,
                                      check_float32_matrix_multiply_path_at_small_sizes)
from tests.problems import leaves_in
from tests.test_cpu_recurrent import assert_float32_error_at_most_twice_the_references, compare, layer_arguments, leaves
assert fastattn.info()["cpu_kernels"][-1] == "layer_gemm_{engine}", fastattn.info()["cpu_kernels"]
for score in ("dot", "cosine"):
    check_float32_matrix_multiply_path(score)
    for shape in SMALL_MATRIX_SHAPES:
        check_float32_matrix_multiply_path_at_small_sizes(score, shape)
for reverse in (False, True):
    for name, arguments in layer_arguments(8, 37, reverse).items():
        assert_float32_error_at_most_twice_the_references(name, arguments)
# K over 256 in the tiles: the input projection at I=300 (LSTM), the steps at H=300 (GRU);
# against the reference run in float32, as test_cpu_recurrent's long tiles (at such K the
# kernel's error against float64 is 1-3x the reference's, by the seed).
for name, features, hidden, gates in (("lstm_layer", 300, 21, 4), ("gru_layer", 5, 300, 3)):
    x, h0, c0 = leaves((9, 3, features), (3, hidden), (3, hidden))
    w_ih, w_hh, b_ih, b_hh = ((w / hidden**0.5).detach().requires_grad_() for w in leaves(
        (gates * hidden, features), (gates * hidden, hidden), (gates * hidden,), (gates * hidden,), seed=1))
    lengths = torch.tensor([9, 4, 0])
    arguments = ((x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, lengths, False) if name == "lstm_layer"
                 else (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, True))
    compare(name, leaves_in(arguments, torch.float32), torch.float32)
print("passed")
"""


@pytest.mark.parametrize("engine", ["blas", "brgemm"])
def test_float32_layers_on_each_engine_match_the_reference(engine):
    """The float32 LSTM/GRU layers (9 steps: the tiles in every step, forward and backward,
    odd sizes, lengths with an empty sequence, reverse) on the engine FASTATTN_CPU_LAYER_GEMM
    picks, and the attention's float32 matrix-multiply path beside them."""
    result = run_with_environment(CHECK_FLOAT32_KERNELS.replace("{engine}", engine), FASTATTN_CPU_LAYER_GEMM=engine)
    assert result.returncode == 0 and result.stdout.strip().endswith("passed"), result.stderr[-3000:]
