"""The Triton ops' plain eager calls past the dispatcher (``fastattn.ops.triton_eager``):
when the body runs directly, that every context that needs the dispatcher still gets the
op, and that both routes give the same outputs.  Under Triton's interpreter on CPU
tensors."""

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastattn
from fastattn import backends
from fastattn.ops import triton_attention, triton_checks, triton_eager, triton_launch

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("triton") is not None, reason=str(backends.unavailable_reason("triton"))
)


def plain(*arguments, **keywords):
    return triton_eager._plain_eager(arguments, keywords)


class PassThroughDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class PassThroughFunction(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class Subclass(torch.Tensor):
    pass


def test_a_plain_eager_call_skips_the_dispatcher_and_nothing_else_does():
    x = torch.ones(2)
    assert plain(x, 3, None, "dot") and plain(torch.nn.Parameter(x), scale=2.0)
    assert plain(x.clone().requires_grad_()) and plain(keys=x.clone().requires_grad_())  # autograd: the Function
    assert triton_eager._records((x.clone().requires_grad_(),)) and not triton_eager._records((x, 3))
    with torch.no_grad():
        assert not triton_eager._records((x.clone().requires_grad_(),))
    assert not plain(x.as_subclass(Subclass))
    with FakeTensorMode():
        assert not plain(x)
    with PassThroughDispatch():
        assert not plain(x)
    with PassThroughFunction():
        assert not plain(x)
    with forward_ad.dual_level():
        assert not plain(x)
    seen = []
    torch.func.vmap(lambda row: seen.append(plain(row)) or row)(torch.ones(2, 3))
    make_fx(lambda tensor: seen.append(plain(tensor)) or tensor * 2)(x)
    assert seen == [False, False]


def _dispatched_ops(call) -> list[str]:
    """The fastattn ops that went through the dispatcher during ``call()`` (the profiler
    records each dispatched op by name; it is no dispatch mode, so it changes no route)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        call()
    return sorted({event.name for event in profile.events() if event.name.startswith("fastattn::")})


@pytest.mark.parametrize("op_name", ["fastattn::triton_attention_forward", "fastattn::triton_lstm_step"])
def test_the_backend_functions_skip_the_dispatcher_with_or_without_autograd_and_agree_with_the_op(op_name):
    """Plain, and with autograd recording (the op's autograd formula around its body), no
    fastattn op is dispatched; under a torch function mode the op is; outputs and gradients
    are the same on both routes."""
    generator = torch.Generator().manual_seed(0)
    query, keys = torch.randn(3, 5, 8, generator=generator), torch.randn(3, 7, 8, generator=generator)
    x, h, c = (torch.randn(3, size, generator=generator) for size in (6, 5, 5))
    w_ih, w_hh = torch.randn(20, 6, generator=generator), torch.randn(20, 5, generator=generator)
    calls = {
        "fastattn::triton_attention_forward":
            lambda q, k: fastattn.attention(q, k, score="dot", lengths=torch.tensor([7, 2, 0])),
        "fastattn::triton_lstm_step":  # x from the query, w_hh from the keys: both differentiated
            lambda q, k: fastattn.lstm_cell(q[:, 0, :6], (h, c), w_ih, k[0, :4].repeat(5, 1)[:20, :5])[0],
    }
    call = calls[op_name]
    results = {}
    with fastattn.backend("triton"):
        outputs = []
        assert _dispatched_ops(lambda: outputs.append(call(query, keys))) == []
        for route in ("direct", "op"):
            leaves = [query.clone().requires_grad_(), keys.clone().requires_grad_()]
            recorded = []
            if route == "direct":
                assert _dispatched_ops(lambda: recorded.append(call(*leaves))) == []
            else:
                with PassThroughFunction():
                    assert op_name in _dispatched_ops(lambda: recorded.append(call(*leaves)))
            gradient = torch.randn(recorded[0].shape, generator=torch.Generator().manual_seed(1))
            results[route] = [recorded[0].detach(), *torch.autograd.grad(recorded[0], leaves, gradient)]
    torch.testing.assert_close(outputs[0], results["direct"][0], rtol=0, atol=0)
    for direct, through_op in zip(results["direct"], results["op"], strict=True):
        torch.testing.assert_close(direct, through_op, rtol=0, atol=0)


# ---------------------------------------------------------------- memoized forward plans


def _decode_problem(seed, batch=3, source_length=37, features=8):
    """A decode step with lengths and a key padding mask (its keys split across programs
    under the interpreter), and the C++ CPU op's outputs for it."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, 1, features, generator=generator)
    keys, values = (torch.randn(batch, source_length, features, generator=generator) for _ in range(2))
    lengths = torch.tensor([source_length, 0, 20])
    key_padding_mask = torch.rand(batch, source_length, generator=generator) < 0.3
    return query, keys, values, None, None, "dot", 0.5, lengths, key_padding_mask, False, None, None, False, True


def _assert_matches_the_cpu_op(arguments, outputs):
    context, weights, _ = torch.ops.fastattn.attention_forward(*arguments)
    torch.testing.assert_close(outputs[0], context, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs[1], weights, rtol=1e-5, atol=1e-6)


@pytest.fixture
def plans(monkeypatch):
    """What each call checked and sent through the launchers (the memoized plans start
    empty in every test: conftest.py)."""
    seen = {"checked": 0, "through_launcher": []}
    check, run_kernel = triton_checks.attention, triton_launch.run_kernel

    def counted_check(*arguments, **keywords):
        seen["checked"] += 1
        return check(*arguments, **keywords)

    def counted_run(kernel, *arguments, **keywords):
        seen["through_launcher"].append(triton_launch._kernel_name(kernel))
        return run_kernel(kernel, *arguments, **keywords)

    monkeypatch.setattr(triton_checks, "attention", counted_check)
    monkeypatch.setattr(triton_launch, "run_kernel", counted_run)
    return seen


def test_a_forward_plan_takes_later_calls_of_the_same_layout_straight_to_the_kernels(plans):
    first = _decode_problem(seed=0)
    _assert_matches_the_cpu_op(first, triton_attention.triton_attention_forward(*first))
    assert plans["checked"] == 1
    assert plans["through_launcher"] == ["attention_forward_kernel", "attention_combine_kernel",
                                         "attention_weights_kernel"]
    second = _decode_problem(seed=1)  # other values, other lengths' rows masked: the same plan
    second[7][:] = torch.tensor([12, 37, 0])
    _assert_matches_the_cpu_op(second, triton_attention.triton_attention_forward(*second))
    assert plans["checked"] == 1 and len(plans["through_launcher"]) == 3
    assert len(triton_launch.LAUNCH_PLANS.plans) == 1


def test_another_layout_dtype_argument_or_matmul_precision_gets_a_plan_of_its_own(plans):
    base = list(_decode_problem(seed=0))
    wide = torch.zeros(3, 1, 16)
    wide[..., :8] = base[0]
    variants = [
        base,
        [wide[..., :8], *base[1:]],  # batch stride 16
        [base[0], base[1].transpose(1, 2).contiguous().transpose(1, 2), *base[2:]],  # keys' feature stride 37
        [*base[:7], None, *base[8:]],  # no lengths
        [*base[:6], 0.25, *base[7:]],  # another scale
        [*base[:13], False],  # no weights
        [*(tensor.half() for tensor in base[:3]), *base[3:]],
    ]
    for arguments in variants:
        outputs = triton_attention.triton_attention_forward(*arguments)
        if arguments[0].dtype == torch.float32:
            context, weights, _ = torch.ops.fastattn.attention_forward(*arguments)
            torch.testing.assert_close(outputs[0], context, rtol=1e-5, atol=1e-6)
    with triton_launch.float32_matmul_precision("tf32"):
        triton_attention.triton_attention_forward(*base)
    assert len(triton_launch.LAUNCH_PLANS.plans) == len(variants) + 1 == plans["checked"]
    for arguments in variants:  # each again: its own plan, no check
        triton_attention.triton_attention_forward(*arguments)
    assert plans["checked"] == len(variants) + 1


def test_the_oldest_plan_is_dropped_past_the_limit(plans, monkeypatch):
    monkeypatch.setattr(triton_launch.LAUNCH_PLANS, "limit", 2)
    base = _decode_problem(seed=0)
    for scale in (0.25, 0.5, 0.75):
        triton_attention.triton_attention_forward(*base[:6], scale, *base[7:])
    scales = [key[10] for key in triton_launch.LAUNCH_PLANS.plans]  # after the op, the 8 tensors and the score
    assert scales == [0.5, 0.75]


def test_a_refused_call_leaves_no_plan_and_is_refused_again(plans):
    query, keys, values = _decode_problem(seed=0)[:3]
    for _ in range(2):
        with pytest.raises(ValueError, match="v and bias are parameters of the additive score only"):
            triton_attention.triton_attention_forward(query, keys, values, torch.ones(8), None, "dot", 1.0, None,
                                                      None, False, None, None, False, False)
    assert triton_launch.LAUNCH_PLANS.plans == {}


def test_traced_calls_make_their_plans_afresh(plans):
    arguments = _decode_problem(seed=0)
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in arguments]
        torch.ops.fastattn.triton_attention_forward(*fakes)
    tensors = [a for a in arguments if isinstance(a, torch.Tensor)]

    def traced(*tensors):
        given = iter(tensors)
        return torch.ops.fastattn.triton_attention_forward(
            *(next(given) if isinstance(a, torch.Tensor) else a for a in arguments))[0]

    make_fx(traced, tracing_mode="fake")(*tensors)
    assert triton_launch.LAUNCH_PLANS.plans == {}
    assert plans["checked"] == 2


def test_a_cell_step_is_checked_once_a_layout(monkeypatch):
    checked = []
    check = triton_checks.cell
    monkeypatch.setattr(triton_checks, "cell", lambda op, *a, **k: (checked.append(op), check(op, *a, **k)))
    generator = torch.Generator().manual_seed(0)
    w_ih, w_hh = torch.randn(20, 6, generator=generator), torch.randn(20, 5, generator=generator)
    for _ in range(3):  # new states each step, as a decoder's
        x, h, c = (torch.randn(3, size, generator=generator) for size in (6, 5, 5))
        with fastattn.backend("triton"):
            got = fastattn.lstm_cell(x, (h, c), w_ih, w_hh)
        want = fastattn.reference.lstm_cell(x, h, c, w_ih, w_hh)
        for got_state, want_state in zip(got, want, strict=True):
            torch.testing.assert_close(got_state, want_state, rtol=1e-5, atol=1e-6)
    assert checked == ["triton_lstm_step"]
    with fastattn.backend("triton"):
        fastattn.lstm_cell(x.T.contiguous().T, (h, c), w_ih, w_hh)  # x strided: a layout of its own
    assert checked == ["triton_lstm_step"] * 2


def test_a_backward_plan_serves_later_backwards_of_the_same_layout(plans, monkeypatch):
    """Two backwards of one layout, other values and lengths: the second checks nothing and
    goes straight to the kernels, and both give the C++ CPU op's gradients."""
    checked = []
    check = triton_checks.attention_backward
    monkeypatch.setattr(triton_checks, "attention_backward",
                        lambda op, *a, **k: (checked.append(op), check(op, *a, **k)))
    for seed, lengths in ((0, [37, 0, 20]), (1, [12, 37, 0])):
        arguments = list(_decode_problem(seed=seed))
        arguments[7] = torch.tensor(lengths)
        gradients = []
        for op in (triton_attention.triton_attention_forward, torch.ops.fastattn.attention_forward):
            leaves = [tensor.clone().requires_grad_() for tensor in arguments[:3]]
            context, weights, _ = op(*leaves, *arguments[3:])
            projection = (context * torch.arange(context.numel()).view(context.shape).cos()).sum() + weights.sum()
            gradients.append(torch.autograd.grad(projection, leaves))
        for got, want in zip(*gradients, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert checked == ["triton_attention_backward"]
    assert plans["through_launcher"].count("attention_grad_query_kernel") == 2  # row terms, then the gradient
    assert plans["through_launcher"].count("attention_grad_key_value_kernel") == 1
