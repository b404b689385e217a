"""``fastattn profile``: a Chrome trace of one benchmark case, and its bad flags."""

import json

import pytest
import torch

from fastattn import backends
from fastattn.cli import main

SMALL = ["--preset", "tiny", "--device", "cpu", "--iterations", "2"]


def _trace_names(path) -> set[str]:
    trace = json.loads(path.read_text())
    return {event.get("name", "") for event in trace["traceEvents"]}


@pytest.mark.skipif(backends.unavailable_reason("cpu") is not None, reason="needs fastattn._C")
def test_trace_shows_the_fastattn_kernels(tmp_path, capsys):
    path = tmp_path / "trace.json"
    status = main(["profile", "attention.additive.multi_query.forward_backward", *SMALL, "--backend", "cpu",
                   "--batch", "3", "--length", "7", "--trace", str(path)])
    assert status == 0
    names = _trace_names(path)
    assert "attention.additive.multi_query.forward_backward [cpu]" in names
    assert any(name.startswith("fastattn::") for name in names), sorted(names)[:40]
    out = capsys.readouterr().out
    assert "fastattn::" in out and f"trace written to {path}" in out


def test_reference_trace_shows_the_aten_ops(tmp_path):
    path = tmp_path / "trace.json"
    assert main(["profile", "lstm_cell.forward", *SMALL, "--backend", "reference", "--trace", str(path)]) == 0
    names = _trace_names(path)
    assert "lstm_cell.forward [reference]" in names and "aten::sigmoid" in names


def test_without_trace_it_only_runs(capsys):
    assert main(["profile", "gru_layer.forward", *SMALL]) == 0
    assert "without the profiler" in capsys.readouterr().out


def _fails(argv, capsys, message):
    assert main(argv) != 0
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["profile", "attention.bogus", *SMALL], "unknown op 'attention.bogus'"),
        (["profile", "attention.additive", *SMALL], "ambiguous op 'attention.additive'; it matches"),
        (["profile", "lstm_cell.forward", *SMALL, "--batch", "0"], "--batch must be an integer of at least 1, got 0"),
        (["profile", "greedy_decoding.forward", *SMALL, "--vocabulary", "3"],
         "--vocabulary must be an integer of at least 4, got 3"),
        (["profile", "lstm_cell.forward", "--preset", "tiny", "--iterations", "0"], "--iterations must be a positive"),
        (["profile", "lstm_cell.forward", *SMALL, "--backend", "cuda"], "--backend cuda: backend 'cuda' is not available"),
    ],
)
def test_bad_profile_flags_fail_cleanly(argv, message, capsys):
    _fails(argv, capsys, message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present, so --device cuda is valid")
def test_profile_on_cuda_without_a_gpu_fails_cleanly(capsys):
    _fails(["profile", "lstm_cell.forward", "--device", "cuda"], capsys, "no CUDA GPU")
