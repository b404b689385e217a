"""The C++ attention forward's float16 / bfloat16 keys and values: for a decode step (and,
in bfloat16, up to about 16 query rows a key: widen_in_the_kernel) its per-row kernel reads them
as they are stored and widens each vector of them to float32 as it loads it (load_lanes in
csrc/cpu/attention.cpp), where it had copied them to float32 first (the copies took 20x
the kernel's time for a bfloat16 decode step).  The cases here are small enough for every
dtype to take the per-row kernel (larger ones of the dot and cosine scores take the GEMMs:
test_cpu_attention_bfloat16_gemm.py)."""

import pytest
import torch

from fastattn import backends
from tests.cpu_capability import run_with_cpu_capability

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("cpu") is not None, reason=str(backends.unavailable_reason("cpu"))
)

DTYPES = [torch.float16, torch.bfloat16]

def _forward(query, keys, values, score="dot", v=None, bias=None, scale=1.0, lengths=None, key_padding_mask=None,
             window=None, center=None, gaussian=False, return_weights=False):
    return torch.ops.fastattn.attention_forward(query, keys, values, v, bias, score, scale, lengths, key_padding_mask,
                                                False, window, center, gaussian, return_weights)


def every_bit_pattern(dtype: torch.dtype) -> torch.Tensor:
    """The 65536 values of a 16-bit dtype: NaNs, infinities, subnormals and both zeros among them."""
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)


def assert_widening_is_exact(dtype: torch.dtype) -> None:
    """Values: one key a row, so its weight is exactly 1 and the context is the value row
    widened and narrowed again: every bit pattern comes back (-0 as 0: 0 + -0 is 0).
    Keys: a one-hot query reads one key element into the row's score, and the row's
    logsumexp (one visible key) is that score, in float32: every finite pattern, exactly;
    one query a key row (a decode step: read in place in both dtypes), so 16 copies of
    each row. Rows of 16 elements: two vectors of the AVX2 kernels, four of the baseline ones."""
    patterns = every_bit_pattern(dtype)
    values = patterns.view(-1, 1, 16)
    rows = values.shape[0]
    context, _, _ = _forward(torch.zeros(rows, 1, 16, dtype=dtype), torch.zeros(rows, 1, 16, dtype=dtype), values)
    torch.testing.assert_close(context, values, rtol=0, atol=0, equal_nan=True)

    finite = patterns[torch.isfinite(patterns.float())]
    key_rows = torch.cat([finite, finite.new_zeros(-finite.numel() % 16)]).view(-1, 16)
    keys = key_rows.repeat_interleave(16, dim=0).unsqueeze(1)
    one_hot = torch.eye(16, dtype=dtype).repeat(key_rows.shape[0], 1).unsqueeze(1)
    _, _, logsumexp = _forward(one_hot, keys, torch.zeros(keys.shape[0], 1, 1, dtype=dtype))
    assert torch.equal(logsumexp.view(-1), key_rows.flatten().float())


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_16_bit_key_and_value_is_widened_exactly(dtype):
    assert_widening_is_exact(dtype)


def test_the_baseline_kernels_widen_every_16_bit_key_and_value_exactly():
    """ATEN_CPU_CAPABILITY=default picks the baseline kernels (16-byte vectors) in place of
    the AVX2 ones, once a process: a process of its own."""
    script = ("import torch, fastattn\n"
              "from tests.test_cpu_attention_16_bit import assert_widening_is_exact\n"
              "for dtype in (torch.float16, torch.bfloat16):\n"
              "    assert_widening_is_exact(dtype)\n"
              "print('exact')\n")
    result = run_with_cpu_capability(script, "default")
    assert result.returncode == 0 and result.stdout.strip() == "exact", result.stderr[-3000:]


def _problem(kernel_score, dtype, queries, dim, value_dim, shared_keys, generator):
    source = 150  # more keys than a block of the kernel (kKeyBlock = 128)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    keys = tensor(1 if shared_keys else 3, source, dim)
    keys[..., 0, :3] = torch.tensor([3e-6, -1e-7, 0.0]).to(dtype)  # float16 subnormals
    arguments = {"query": tensor(3, queries, dim), "keys": keys, "values": tensor(3, source, value_dim),
                 "score": kernel_score, "scale": 1.0 if kernel_score == "additive" else 0.6,
                 "lengths": torch.tensor([source, 0, 97]),
                 "key_padding_mask": torch.rand(3, source, generator=generator) > 0.8, "return_weights": True}
    if kernel_score == "additive":
        arguments.update(v=tensor(dim), bias=tensor(dim))
    return arguments


@pytest.mark.parametrize("shared_keys", [False, True], ids=["keys_per_batch", "keys_shared_by_the_batch"])
@pytest.mark.parametrize(("queries", "dim", "value_dim"), [(1, 37, 19), (2, 8, 3), (3, 130, 64)])
@pytest.mark.parametrize("kernel_score", ["dot", "cosine", "additive"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_16_bit_inputs_give_the_outputs_of_their_float32_copies(dtype, kernel_score, queries, dim, value_dim,
                                                                 shared_keys):
    """The kernel computes in float32 as before, so the outputs are those of the op on
    float32 copies, rounded to dtype: within one rounding of dtype (the float32 sums may
    differ in their last bit where the compiler contracts a product differently) over
    feature sizes with a vector tail, a decode step and several rows (keys read in place,
    or copied: float16 past 2 rows a key), lengths with a fully masked row, padding, and
    windowed rows with the Gaussian factor.  Up to 3 rows, where float32 too takes the
    per-row kernel (from 4 rows a key its GEMMs, which sum in another order)."""
    generator = torch.Generator().manual_seed(queries * 1000 + dim)
    arguments = _problem(kernel_score, dtype, queries, dim, value_dim, shared_keys, generator)
    windowed = dict(arguments, window=4, center=torch.rand(3, queries, generator=generator) * 150, gaussian=True)
    for case in (arguments, windowed):
        got = _forward(**case)
        in_float32 = {name: value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
                      for name, value in case.items()}
        expected = _forward(**in_float32)
        assert got[0].dtype == got[1].dtype == dtype and got[2].dtype == torch.float32
        assert got[0][1].abs().max() == 0 and got[1][1].abs().max() == 0  # lengths 0: a fully masked row
        for output, want in zip(got[:2], expected[:2]):
            torch.testing.assert_close(output.float(), want.to(dtype).float(), rtol=torch.finfo(dtype).eps, atol=0)
        torch.testing.assert_close(got[2], expected[2], rtol=1e-6, atol=0)


@pytest.mark.parametrize("key_batch", [17, 1], ids=["keys_per_batch", "keys_shared_by_the_batch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_per_row_forward_makes_no_float32_copy_of_16_bit_keys_or_values(dtype, key_batch):
    """A decode step of 17 rows over 12 keys (under 16: the per-row kernel in every dtype),
    with their own keys or with keys shared by the batch (the location score's W_a, read
    by all 17 rows, which a copy of the 17 rows' values would cost more than): the
    profiler sees the copies the op makes (the query's, to float32, is one); none is of
    the keys or the values."""
    query, keys = torch.randn(17, 1, 24).to(dtype), torch.randn(key_batch, 12, 24).to(dtype)
    values = torch.randn(17, 12, 40).to(dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profile:
        _forward(query, keys, values)
    copied = [list(event.input_shapes[0]) for event in profile.events() if event.name == "aten::_to_copy"]
    assert [17, 1, 24] in copied
    assert not any(shape[1:] in ([12, 24], [12, 40]) for shape in copied), copied
