"""The public functions' host path: the tensor ops a call dispatches besides the kernel's,
and the shared checks' fast paths, which must accept and refuse what the full checks do."""

import pytest
import torch

import fastattn
from fastattn import backends, checks
from tests.op_log import OpLog


def _dispatched(call):
    call()  # first call: the range check of lengths, once per tensor version
    with OpLog() as seen:
        call()
    return seen.names


requires_cpu_backend = pytest.mark.skipif(
    backends.unavailable_reason("cpu") is not None, reason="needs the C++ extension"
)


@requires_cpu_backend
@pytest.mark.parametrize("grad", [False, True])
def test_canonical_shapes_dispatch_the_kernel_alone(grad):
    """(B, T, D) queries, (B, S, D) keys and int64 lengths are what the kernel takes: no
    reshape, view or cast runs around it."""
    query, keys = torch.randn(2, 3, 4, requires_grad=grad), torch.randn(2, 5, 4, requires_grad=grad)
    lengths = torch.tensor([5, 2])
    with fastattn.backend("cpu"):
        names = _dispatched(lambda: fastattn.attention(query, keys, score="dot", lengths=lengths))
    assert names[0] == "fastattn::attention_forward"
    assert set(names[1:]) <= {"aten::clone"}  # with autograd, the C++ autograd's saved copy of lengths


@requires_cpu_backend
def test_a_decoder_step_adds_only_the_query_and_context_views():
    query, keys = torch.randn(2, 4), torch.randn(2, 5, 4)
    with fastattn.backend("cpu"):
        names = _dispatched(lambda: fastattn.attention(query, keys, score="dot"))
        context = fastattn.attention(query, keys, score="dot")
    assert names == ["aten::view", "fastattn::attention_forward", "aten::view"]
    assert context.shape == (2, 4)


@requires_cpu_backend
def test_the_cells_dispatch_the_kernel_alone():
    x, h, c = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 4)
    lstm_weights, gru_weights = (torch.randn(16, 3), torch.randn(16, 4)), (torch.randn(12, 3), torch.randn(12, 4))
    with fastattn.backend("cpu"):
        lstm = _dispatched(lambda: fastattn.lstm_cell(x, (h, c), *lstm_weights))
        gru = _dispatched(lambda: fastattn.gru_cell(x, h, *gru_weights))
    assert lstm == ["fastattn::lstm_cell_forward"]
    assert gru == ["fastattn::gru_cell_forward"]


def test_value_checks_do_not_ask_the_driver_for_devices(monkeypatch):
    """Whether a CUDA graph is being captured is read from torch's CUDA state, not from
    torch.cuda.is_available(), which queries the driver at every call."""

    def refuse():
        raise AssertionError("torch.cuda.is_available() was called")

    monkeypatch.setattr(torch.cuda, "is_available", refuse)
    assert checks.reads_values(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, S=2\]"):
        fastattn.attention(torch.randn(2, 3), torch.randn(2, 2, 3), lengths=torch.tensor([1, 3]))


def _raised(check):
    try:
        check()
    except (TypeError, ValueError) as error:
        return type(error), str(error)
    return None


def _float_then_like(name, value, reference_name, reference):
    checks.float_tensor(name, value)
    checks.like(name, value, reference_name, reference)


@pytest.mark.parametrize(
    "value",
    [
        torch.randn(2, 3),
        torch.randn(3, 2).T,
        torch.randn(2, 3, dtype=torch.float64),
        torch.randn(2, 3, dtype=torch.float16),
        torch.ones(2, 3, dtype=torch.int64),
        torch.randn(2, 3, device="meta"),
        torch.randn(2, 3).to_sparse(),
        torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]),
        [1.0, 2.0],
        None,
    ],
    ids=["same", "strided", "float64", "float16", "int64", "meta", "sparse", "nested", "list", "none"],
)
@pytest.mark.parametrize("autocast", [False, True])
def test_float_like_accepts_and_refuses_what_float_tensor_then_like_do(value, autocast):
    reference = torch.randn(4)
    with torch.autocast("cpu", enabled=autocast):
        expected = _raised(lambda: _float_then_like("x", value, "w", reference))
        assert _raised(lambda: checks.float_like("x", value, "w", reference)) == expected
        if expected is None:
            assert checks.float_like("x", value, "w", reference) is value


@pytest.mark.parametrize(
    "expected, refused",
    [((2, 3), False), ((None, 3), False), ((None, None), False), ((2, 4), True), ((None, 4), True), ((2,), True),
     ((2, 3, 1), True), ((), True)],
)
def test_shape_compares_every_given_size(expected, refused):
    value = torch.randn(2, 3)
    if refused:
        with pytest.raises(ValueError, match=r"x must have shape \(B, 3\), got a torch.float32 tensor of shape \(2, 3\)"):
            checks.shape("x", value, expected, "(B, 3)")
    else:
        checks.shape("x", value, expected, "(B, 3)")
