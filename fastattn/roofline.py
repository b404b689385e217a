"""Roofline arithmetic: the work each benchmarked op must do, and the fastest a device could do it.

For one op at one shape, :class:`Work` counts

* ``bytes``: what an ideal fused kernel moves to and from memory: every input read once,
  every output written once (keys double as values when no values are given);
* ``flops``: the multiply-adds of the matrix-product-shaped terms, 2 per multiply-add
  (scores, projections, contexts, gate products); elementwise arithmetic is not counted;
* ``transcendentals``: exp, tanh, sigmoid, log and sqrt evaluations (special-function
  unit work on a GPU).

Forward+backward counts are derived from the forward's by one convention, used for
every op: the backward does twice the forward's FLOPs (a gradient for each operand of
every product), and reads every input and the output gradients and writes every input
gradient, so ``bytes = 3 * inputs + 2 * outputs`` and ``flops = 3 * forward``.  Its
transcendentals: attention's backward evaluates the forward's again (an ideal fused
backward recomputes exp and tanh from the saved log-sum-exp rather than storing
T x S (x Da) intermediates), so they double; the recurrent ops' backward reads the
gate activations the forward saved (a few B x H per step, not counted) and adds none.

A device's limit (:class:`DeviceLimits`) gives the lower bound on the time of a
:class:`Work`: the largest of bytes / bandwidth, flops / FLOP rate and
transcendentals / special-function rate; ``percent_of_limit`` is that bound as a
percentage of a measured time.  GPUs are looked up by name in :data:`KNOWN_GPUS`;
a CPU has no FLOP table here, so on a CPU the limit is the measured memory-copy
bandwidth alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Work:
    bytes: float
    flops: float
    transcendentals: float

    def __add__(self, other: Work) -> Work:
        return Work(self.bytes + other.bytes, self.flops + other.flops, self.transcendentals + other.transcendentals)

    def times(self, factor: int) -> Work:
        return Work(self.bytes * factor, self.flops * factor, self.transcendentals * factor)


def with_backward(forward_flops: float, transcendentals: float, input_elements: float,
                  output_elements: float, element_bytes: int) -> Work:
    """Forward+backward work under the convention of the module docstring."""
    return Work(element_bytes * (3 * input_elements + 2 * output_elements), 3 * forward_flops, transcendentals)


def _work(flops: float, transcendentals: float, input_elements: float, output_elements: float,
          element_bytes: int, backward: bool) -> Work:
    if backward:
        return with_backward(flops, transcendentals, input_elements, output_elements, element_bytes)
    return Work(element_bytes * (input_elements + output_elements), flops, transcendentals)


def attention_work(score: str, batch: int, queries: int, keys: int, dim: int, *,
                   element_bytes: int, backward: bool = False, cached_keys: bool = False) -> Work:
    """Soft attention with D = Dq = Dk = Dv = Da, values = keys; ``queries`` = 1 for a decoder step.
    ``cached_keys`` (additive): the projected keys W_k h are an input, computed beforehand.

    Only the context is an output (weights are not returned)."""
    pairs = batch * queries * keys
    context_flops = 2 * pairs * dim
    exps = pairs
    inputs = batch * queries * dim + batch * keys * dim
    if score in ("dot", "scaled_dot"):
        score_flops = 2 * pairs * dim
    elif score == "cosine":
        score_flops = 2 * pairs * dim
        exps += batch * (queries + keys)  # one sqrt per query and per key norm
    elif score == "general":  # W_a applied on the shorter side, then a dot product
        score_flops = 2 * batch * min(queries, keys) * dim * dim + 2 * pairs * dim
        inputs += dim * dim
    elif score == "additive" and cached_keys:  # W_q s, then v_a . tanh(...) per pair; reads K'
        score_flops = 2 * batch * queries * dim * dim + 2 * pairs * dim
        exps += pairs * dim  # tanh
        inputs += dim * dim + 2 * dim + batch * keys * dim
    elif score == "additive":  # W_q s, W_k h, then v_a . tanh(...) per pair
        score_flops = 2 * batch * (queries + keys) * dim * dim + 2 * pairs * dim
        exps += pairs * dim  # tanh
        inputs += 2 * dim * dim + 2 * dim
    elif score == "location":  # (W_a s)_j for the first S rows of W_a
        score_flops = 2 * pairs * dim
        inputs += keys * dim
    else:
        raise ValueError(f"score must be one of dot, scaled_dot, general, additive, cosine, location; got {score!r}")
    recomputed = 2 if backward else 1  # the backward's exp (and tanh) again: see the module docstring
    return _work(score_flops + context_flops, recomputed * exps, inputs, batch * queries * dim, element_bytes, backward)


def hard_attention_work(batch: int, queries: int, keys: int, dim: int, *, element_bytes: int) -> Work:
    """Scaled-dot hard attention, forward: scores, softmax, one log per query; the context is a
    gather (no FLOPs).  Outputs: context, log-probability, weights, and an int64 index."""
    pairs = batch * queries * keys
    inputs = batch * (queries + keys) * dim
    outputs = batch * queries * dim + batch * queries + pairs
    index_bytes = 8 * batch * queries
    return Work(element_bytes * (inputs + outputs) + index_bytes, 2 * pairs * dim, pairs + batch * queries)


GATES = {"lstm": 4, "gru": 3}
CELL_TRANSCENDENTALS = {"lstm": 5, "gru": 3}  # LSTM: 3 sigmoids, 2 tanh; GRU: 2 sigmoids, 1 tanh
STATES = {"lstm": 2, "gru": 1}


def _cell_parameters(cell: str, input_size: int, hidden: int) -> int:
    gates = GATES[cell] * hidden
    return gates * (input_size + hidden) + 2 * gates


def cell_work(cell: str, batch: int, input_size: int, hidden: int, *, element_bytes: int,
              backward: bool = False) -> Work:
    """One LSTM/GRU cell step with both biases: input, state(s) and weights in, new state(s) out."""
    flops = 2 * batch * GATES[cell] * hidden * (input_size + hidden)
    states = STATES[cell] * batch * hidden
    inputs = batch * input_size + states + _cell_parameters(cell, input_size, hidden)
    return _work(flops, CELL_TRANSCENDENTALS[cell] * batch * hidden, inputs, states, element_bytes, backward)


def layer_work(cell: str, steps: int, batch: int, input_size: int, hidden: int, *, element_bytes: int,
               backward: bool = False) -> Work:
    """One layer over ``steps`` time steps from a zero state: the sequence and the weights in,
    every step's hidden state and the final state(s) out."""
    flops = 2 * steps * batch * GATES[cell] * hidden * (input_size + hidden)
    inputs = steps * batch * input_size + _cell_parameters(cell, input_size, hidden)
    outputs = steps * batch * hidden + STATES[cell] * batch * hidden
    transcendentals = CELL_TRANSCENDENTALS[cell] * steps * batch * hidden
    return _work(flops, transcendentals, inputs, outputs, element_bytes, backward)


def decoder_step_work(batch: int, keys: int, hidden: int, *, element_bytes: int) -> Work:
    """One ``AttentionDecoderCell`` step, forward, as benchmarked: input size = key size =
    attention size = ``hidden``, LSTM cell, additive score on precomputed W_k h, input feeding.

    The LSTM cell reads [y; h~] (2H wide: the previous attentional vector is counted there)
    and the state; attention reads the cached W_k h and the values;
    the output h~ = tanh(W_c [c; s]) is also the new state's attentional vector."""
    cell = cell_work("lstm", batch, 2 * hidden, hidden, element_bytes=element_bytes)
    pairs = batch * keys
    attention_flops = 2 * batch * hidden * hidden + 2 * pairs * hidden + 2 * pairs * hidden
    combine_flops = 2 * batch * hidden * 2 * hidden
    attention_elements = 2 * batch * keys * hidden + hidden * hidden + 2 * hidden + 2 * hidden * hidden
    outputs = batch * hidden + pairs  # h~ and the weights (the new s, c are counted by the cell)
    return cell + Work(
        element_bytes * (attention_elements + outputs),
        attention_flops + combine_flops,
        pairs * hidden + pairs + batch * hidden,  # tanh per pair, exp per pair, tanh of h~
    )


def greedy_decoding_work(tokens: int, batch: int, keys: int, hidden: int, vocabulary: int, *,
                         element_bytes: int) -> Work:
    """``tokens`` decoder steps, each followed by the vocabulary projection and an argmax;
    weights are counted as re-read every step (each step is its own sequence of kernels)."""
    projection = Work(
        element_bytes * (vocabulary * hidden + vocabulary + batch * hidden + batch * vocabulary),
        2 * batch * hidden * vocabulary,
        0,
    )
    return (decoder_step_work(batch, keys, hidden, element_bytes=element_bytes) + projection).times(tokens)


@dataclass(frozen=True)
class DeviceLimits:
    """Peak rates of one device; ``None`` where unknown (then that term is left out)."""

    name: str
    bandwidth: float  # bytes/s
    flops: dict[str, float | None]  # dtype name -> matrix FLOP/s
    transcendentals: float | None  # special-function evaluations/s

    def bounds_s(self, work: Work, dtype: str) -> dict[str, float]:
        """Per resource the device knows a peak of ("memory", "compute", "special functions"):
        the shortest time it could take for ``work`` if that resource were its only limit."""
        terms = {"memory": work.bytes / self.bandwidth}
        flop_rate = self.flops.get(dtype)
        if flop_rate:
            terms["compute"] = work.flops / flop_rate
        if self.transcendentals:
            terms["special functions"] = work.transcendentals / self.transcendentals
        return terms

    def lower_bound_s(self, work: Work, dtype: str) -> tuple[float, str]:
        """The shortest time the device could take for ``work`` and the resource that sets it."""
        terms = self.bounds_s(work, dtype)
        bound = max(terms, key=terms.get)
        return terms[bound], bound


def _check_time(measured_s: float) -> None:
    if not (measured_s > 0 and math.isfinite(measured_s)):
        raise ValueError(f"measured_s must be a positive finite time, got {measured_s!r}")


def percent_of_limit(work: Work, limits: DeviceLimits, dtype: str, measured_s: float) -> tuple[float, str]:
    """(lower bound / measured time * 100, the bounding resource)."""
    _check_time(measured_s)
    bound_s, resource = limits.lower_bound_s(work, dtype)
    return 100.0 * bound_s / measured_s, resource


def percent_of_each(work: Work, limits: DeviceLimits, dtype: str, measured_s: float) -> dict[str, float]:
    """Per resource of :meth:`DeviceLimits.bounds_s`: its bound / measured time * 100 (so
    "memory" is the share of the memory bandwidth reached, whatever bounds the op)."""
    _check_time(measured_s)
    return {resource: 100.0 * bound_s / measured_s for resource, bound_s in limits.bounds_s(work, dtype).items()}


def _card(name: str, bandwidth_tb: float, bf16_tflops: float, fp32_tflops: float, tf32_tflops: float, sms: int,
          boost_ghz: float) -> DeviceLimits:
    """Dense (no sparsity) tensor-core peaks for float16 / bfloat16; float32 matrix work at
    the CUDA cores' float32 peak, what torch's default (no TF32) runs it on
    (:func:`float32_on_tf32` rates it at the TF32 tensor-core peak instead, for a run with
    TF32 allowed).  Special functions: 16 results per clock per SM (CUDA C++ Programming
    Guide, "Arithmetic Instructions" throughput table, compute capability 8.0 and 9.0: the
    MUFU ops exp2, log2, rsqrt, sin, cos; tanh.approx.f32 runs on the same unit) x SMs x
    boost clock; for the H100 SXM / H200, 16 x 132 x 1.98 GHz = 4.18e12 evaluations/s.  The
    packed tanh.approx.bf16x2 of sm_90 gives two bf16 results per op, which this single rate
    does not model."""
    return DeviceLimits(
        name,
        bandwidth_tb * 1e12,
        {"float16": bf16_tflops * 1e12, "bfloat16": bf16_tflops * 1e12, "float32": fp32_tflops * 1e12,
         TF32: tf32_tflops * 1e12, "float64": None},
        16 * sms * boost_ghz * 1e9,
    )


TF32 = "tf32"  # the flops key of a card's TF32 tensor-core peak


def float32_on_tf32(card: DeviceLimits) -> DeviceLimits:
    """``card`` with float32 matrix work rated at its TF32 tensor-core peak."""
    return replace(card, name=f"{card.name} (float32 on TF32)", flops={**card.flops, "float32": card.flops[TF32]})


# Sources: NVIDIA H100 Tensor Core GPU datasheet (SXM5 and PCIe columns; the datasheet's
# sparse figures halved), NVIDIA H200 Tensor Core GPU datasheet (SXM), NVIDIA A100 Tensor
# Core GPU datasheet (40GB/80GB, SXM4/PCIe); SM counts and boost clocks from the NVIDIA
# H100 (Hopper) and A100 (Ampere GA100) architecture whitepapers.
KNOWN_GPUS = {
    "H200": _card("H200", 4.8, 989.4, 66.9, 494.7, sms=132, boost_ghz=1.98),
    "H100 SXM": _card("H100 SXM", 3.35, 989.4, 66.9, 494.7, sms=132, boost_ghz=1.98),
    "H100 PCIe": _card("H100 PCIe", 2.0, 756.0, 51.2, 378.0, sms=114, boost_ghz=1.755),
    "A100 SXM 80GB": _card("A100 SXM 80GB", 2.039, 312.0, 19.5, 156.0, sms=108, boost_ghz=1.41),
    "A100 SXM 40GB": _card("A100 SXM 40GB", 1.555, 312.0, 19.5, 156.0, sms=108, boost_ghz=1.41),
    "A100 PCIe 80GB": _card("A100 PCIe 80GB", 1.935, 312.0, 19.5, 156.0, sms=108, boost_ghz=1.41),
    "A100 PCIe 40GB": _card("A100 PCIe 40GB", 1.555, 312.0, 19.5, 156.0, sms=108, boost_ghz=1.41),
}
# Variants of those chips with other memory, clocks or SM counts, which the table does not
# hold: NVL boards (H100 NVL: another bandwidth and clock; H200 NVL: another clock) and the
# Grace Hopper superchips (GH200: other memory).  Their names contain the chips' names, so
# they are told apart first and rated as unknown, never as the card they resemble.
UNLISTED_VARIANTS = ("NVL", "GH200", "GH100")


def known_gpu(device_name: str) -> DeviceLimits | None:
    """The table entry for a ``torch.cuda.get_device_name()`` string, or None when unknown.

    ``"NVIDIA H100 80GB HBM3"`` is the SXM card; PCIe cards say so in their names, and
    40 GB A100s carry "40GB"."""
    name = device_name.upper()
    if any(variant in name for variant in UNLISTED_VARIANTS):
        return None
    pcie = "PCIE" in name
    if "H200" in name:
        return KNOWN_GPUS["H200"]
    if "H100" in name:
        return KNOWN_GPUS["H100 PCIe" if pcie else "H100 SXM"]
    if "A100" in name:
        size = "40GB" if "40GB" in name else "80GB"
        return KNOWN_GPUS[f"A100 {'PCIe' if pcie else 'SXM'} {size}"]
    return None


def cpu_limits(copy_bandwidth: float) -> DeviceLimits:
    """A CPU rated by its measured memory-copy bandwidth only (no FLOP or special-function peak)."""
    return DeviceLimits("cpu (measured copy bandwidth)", copy_bandwidth, {}, None)
