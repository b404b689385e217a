"""Backend selection: precedence of the settings, clear errors, and auto's fallback."""

import os
import re

import pytest
import torch

import fastattn
from fastattn import backends
from tests.op_log import OpLog


@pytest.fixture(autouse=True)
def restore_setting(monkeypatch):
    monkeypatch.delenv(backends.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(backends, "_session_backend", None)


def test_default_is_auto_and_auto_runs_the_cpu_kernels_when_built_else_the_reference():
    assert backends.current_backend() == "auto"
    expected = "cpu" if backends.unavailable_reason("cpu") is None else "reference"
    for op in backends.OPS:
        assert backends.auto_choice(op, "cpu") == expected, op
    query, keys = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    with OpLog() as seen:
        fastattn.attention(query, keys)
    assert ("fastattn::attention_forward" in seen.names) == (expected == "cpu"), seen.names


def test_precedence_context_over_set_backend_over_environment(monkeypatch):
    monkeypatch.setenv(backends.ENVIRONMENT_VARIABLE, "cpu")
    assert backends.current_backend() == "cpu"
    fastattn.set_backend("triton")
    assert backends.current_backend() == "triton"
    with fastattn.backend("reference"):
        assert backends.current_backend() == "reference"
        with fastattn.backend("cuda"):
            assert backends.current_backend() == "cuda"
        assert backends.current_backend() == "reference"
    assert backends.current_backend() == "triton"


@pytest.mark.parametrize("name, error", [("fast", ValueError), ("", ValueError), (None, TypeError), ("CPU", ValueError)])
def test_unknown_backend_names_are_rejected(name, error):
    with pytest.raises(error, match="must be one of"):
        fastattn.set_backend(name)
    with pytest.raises(error, match="must be one of"):
        with fastattn.backend(name):
            pass


def test_unknown_backend_in_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv(backends.ENVIRONMENT_VARIABLE, "gpu")
    with pytest.raises(ValueError, match="FASTATTN_BACKEND"):
        fastattn.attention(torch.randn(2, 3), torch.randn(2, 4, 3))


MISSING_BACKENDS = [name for name in ("cpu", "triton", "cuda") if backends.unavailable_reason(name) is not None]


@pytest.mark.parametrize("name", MISSING_BACKENDS)
def test_asking_for_a_missing_backend_says_what_is_missing(name):
    reason = backends.unavailable_reason(name)
    with fastattn.backend(name):
        with pytest.raises(fastattn.BackendUnavailableError, match=name) as error:
            fastattn.attention(torch.randn(2, 3), torch.randn(2, 4, 3))
    assert reason in str(error.value)
    assert re.search(r"'attention' on cpu tensors runs here on: reference\b", str(error.value))


def test_cuda_backend_missing_message_is_the_one_users_expect():
    if backends.unavailable_reason("cuda") is None:
        pytest.skip("CUDA kernels are built here and a CUDA device is present")
    built = fastattn.info()["extension"] is not None and "cuda" in fastattn.info()["extension"]["backends"]
    expected = "torch sees no CUDA device" if built else "built without CUDA kernels"
    assert expected in backends.unavailable_reason("cuda")


def test_registered_backend_is_picked_by_auto_and_limited_to_its_devices():
    calls = []

    def fake_cell(*arguments):
        calls.append(arguments)
        return arguments[1]

    saved = {op: dict(found) for op, found in backends._implementations.items()}, dict(backends._unavailable_reasons)
    try:
        for op in ("lstm_cell", "gru_cell"):  # whatever the real GPU backends registered
            for name in ("triton", "cuda"):
                backends._implementations[op].pop(name, None)
        backends.register("gru_cell", "triton", ("cuda",))(fake_cell)
        backends.mark_available("triton")
        assert backends.auto_choice("gru_cell", "cuda") == "triton"
        assert backends.auto_choice("lstm_cell", "cuda") == "reference"
        h = torch.randn(2, 3)
        assert backends.implementation("gru_cell", "cuda")(torch.randn(2, 4), h) is h
        assert len(calls) == 1
        with pytest.raises(fastattn.BackendUnavailableError, match="cpu"):
            backends.implementation("gru_cell", "cpu", "triton")
        with pytest.raises(fastattn.BackendUnavailableError, match="no kernel for op 'lstm_cell'"):
            backends.implementation("lstm_cell", "cuda", "triton")
    finally:
        for op, found in saved[0].items():
            backends._implementations[op].clear()
            backends._implementations[op].update(found)
        backends._unavailable_reasons.clear()
        backends._unavailable_reasons.update(saved[1])


def test_the_reference_runs_on_any_device():
    query, keys = torch.randn(2, 3, device="meta"), torch.randn(2, 4, 3, device="meta")
    with fastattn.backend("reference"):
        assert fastattn.attention(query, keys).shape == (2, 3)


def test_info_reports_the_auto_choice_per_op():
    report = fastattn.info()
    expected = "cpu" if backends.unavailable_reason("cpu") is None else "reference"
    assert report["auto"]["cpu"] == {op: expected for op in backends.OPS}


def test_the_cpu_backend_is_built_unless_switched_off():
    """An install builds fastattn._C (a failed compile fails the install), so the C++
    tests cannot skip silently: only FASTATTN_SKIP_EXTENSION=1 turns them off."""
    if os.environ.get("FASTATTN_SKIP_EXTENSION") == "1":
        assert "FASTATTN_SKIP_EXTENSION" in backends.unavailable_reason("cpu")
    else:
        assert backends.unavailable_reason("cpu") is None


def test_a_block_ending_in_another_thread_removes_its_own_setting():
    """Thread A enters backend("cpu"), thread B backend("reference"), A leaves: B's block
    still runs on "reference" (A's exit had popped B's setting, the innermost)."""
    import threading

    entered, b_entered, a_left = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def thread_a():
        with fastattn.backend("cpu"):
            entered.set()
            b_entered.wait()
        a_left.set()

    def thread_b():
        entered.wait()
        with fastattn.backend("reference"):
            b_entered.set()
            a_left.wait()
            seen.append(backends.current_backend())
        seen.append(backends.current_backend())

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert seen == ["reference", backends.current_backend()]


def test_a_block_applies_to_its_own_thread_only_compiled_code_included():
    """As torch.no_grad: another thread's block does not change what this one runs, and a
    compiled function follows the setting of the thread calling it."""
    import threading

    compiled = torch.compile(lambda x: (x + 1, backends.current_backend()), fullgraph=True)
    in_block, checked = threading.Event(), threading.Event()
    seen = {}

    def other_thread():
        with fastattn.backend("reference"):
            seen["other"] = backends.current_backend(), compiled(torch.zeros(1))[1]
            in_block.set()
            checked.wait(timeout=60)

    thread = threading.Thread(target=other_thread)
    thread.start()
    in_block.wait(timeout=60)
    seen["this"] = backends.current_backend(), compiled(torch.zeros(1))[1]
    checked.set()
    thread.join(timeout=60)
    assert seen == {"other": ("reference", "reference"), "this": ("auto", "auto")}
