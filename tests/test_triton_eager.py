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
from fastattn.ops import triton_eager

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
    assert plain(x, 3, None, "dot") and plain(torch.nn.Parameter(x, requires_grad=False), scale=2.0)
    assert not plain(x.clone().requires_grad_())  # autograd records the op
    with torch.no_grad():
        assert plain(x.clone().requires_grad_())
    assert plain(keys=x) and not plain(keys=x.clone().requires_grad_())
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


def test_the_backend_functions_take_the_direct_route_only_when_plain_and_agree_with_the_op():
    generator = torch.Generator().manual_seed(0)
    query, keys = torch.randn(3, 5, 8, generator=generator), torch.randn(3, 7, 8, generator=generator)
    x, h, c = (torch.randn(3, size, generator=generator) for size in (6, 5, 5))
    w_ih, w_hh = torch.randn(20, 6, generator=generator), torch.randn(20, 5, generator=generator)
    calls = {
        "fastattn::triton_attention_forward": lambda q: fastattn.attention(q, keys, score="dot", lengths=torch.tensor([7, 2, 0])),
        "fastattn::triton_lstm_step": lambda q: fastattn.lstm_cell(x, (h, c), w_ih, w_hh)[0] + q.sum(),
    }
    with fastattn.backend("triton"):
        for op_name, call in calls.items():
            direct = []
            assert _dispatched_ops(lambda: direct.append(call(query))) == []
            tracked = query.clone().requires_grad_()
            if op_name == "fastattn::triton_lstm_step":
                x.requires_grad_()
            through_op = []
            assert op_name in _dispatched_ops(lambda: through_op.append(call(tracked)))
            x.requires_grad_(False)
            torch.testing.assert_close(direct[0], through_op[0].detach(), rtol=0, atol=0)
