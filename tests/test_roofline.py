"""The roofline arithmetic against hand-computed cases, and the card table."""

import pytest

from fastattn import roofline
from fastattn.roofline import DeviceLimits, Work


def test_dot_attention_forward():
    # B=2, T=3, S=5, D=4: 30 (query, key) pairs; scores 2*30*4 FLOPs, context 2*30*4, 30 exps;
    # bytes: query 2*3*4 + keys 2*5*4 + context 2*3*4 = 88 floats.
    work = roofline.attention_work("dot", 2, 3, 5, 4, element_bytes=4)
    assert work == Work(bytes=352, flops=480, transcendentals=30)


def test_dot_attention_forward_backward_is_three_inputs_and_two_outputs():
    # The backward recomputes the 30 exps from the saved log-sum-exp: 60 in all.
    work = roofline.attention_work("dot", 2, 3, 5, 4, element_bytes=4, backward=True)
    assert work == Work(bytes=4 * (3 * 64 + 2 * 24), flops=3 * 480, transcendentals=60)


def test_additive_forward_backward_evaluates_the_tanh_again():
    forward = roofline.attention_work("additive", 2, 3, 5, 4, element_bytes=4)
    both = roofline.attention_work("additive", 2, 3, 5, 4, element_bytes=4, backward=True)
    assert both.transcendentals == 2 * forward.transcendentals == 300 and both.flops == 3 * forward.flops


def test_recurrent_backward_adds_no_transcendentals():
    assert roofline.layer_work("lstm", 4, 2, 3, 5, element_bytes=4, backward=True).transcendentals == 5 * 4 * 2 * 5


def test_additive_attention_forward():
    # W_q s: 2*2*3*4*4 = 192, W_k h: 2*2*5*4*4 = 320, v.tanh: 2*30*4 = 240, context 240;
    # tanh 30*4 = 120 plus 30 exps; parameters 2*16 + 2*4 = 40 floats.
    work = roofline.attention_work("additive", 2, 3, 5, 4, element_bytes=4)
    assert work == Work(bytes=4 * (24 + 40 + 40 + 24), flops=992, transcendentals=150)


def test_additive_attention_on_cached_projected_keys():
    # No W_k h (992 - 320 FLOPs); reads K' (2*5*4 = 40 floats) instead of W_k (16).
    work = roofline.attention_work("additive", 2, 3, 5, 4, element_bytes=4, cached_keys=True)
    assert work == Work(bytes=4 * (24 + 40 + 16 + 8 + 40 + 24), flops=672, transcendentals=150)


@pytest.mark.parametrize(
    "score, flops, transcendentals, extra_inputs",
    [
        ("scaled_dot", 480, 30, 0),
        ("cosine", 480, 30 + 2 * (3 + 5), 0),  # one sqrt per query and key norm
        ("general", 2 * 2 * 3 * 16 + 480, 30, 16),  # W_a on the 3 queries
        ("location", 480, 30, 5 * 4),  # the first S=5 rows of W_a
    ],
)
def test_other_scores(score, flops, transcendentals, extra_inputs):
    work = roofline.attention_work(score, 2, 3, 5, 4, element_bytes=2)
    assert work == Work(bytes=2 * (88 + extra_inputs), flops=flops, transcendentals=transcendentals)


def test_decode_step_is_one_query():
    assert roofline.attention_work("dot", 2, 1, 5, 4, element_bytes=4) == Work(4 * (8 + 40 + 8), 160, 10)


def test_hard_attention():
    # B=1, T=2, S=3, D=4: scores 2*6*4 = 48 FLOPs, 6 exps + 2 logs; reads 5*4 floats; writes
    # context 8, log-prob 2, weights 6 floats and 2 int64 indices.
    assert roofline.hard_attention_work(1, 2, 3, 4, element_bytes=4) == Work(4 * (20 + 16) + 16, 48, 8)


def test_lstm_cell_in_half_precision():
    # B=2, I=3, H=5: gates 4H=20; FLOPs 2*2*20*(3+5) = 640; weights 20*8 + 2*20 = 200;
    # reads x 6 + h, c 20 + weights 200, writes h', c' 20; 5 transcendentals per unit.
    assert roofline.cell_work("lstm", 2, 3, 5, element_bytes=2) == Work(2 * 246, 640, 50)


def test_gru_layer():
    # T=4, B=2, I=3, H=5: gates 3H=15; FLOPs 2*4*2*15*8 = 1920; reads the sequence 24 and the
    # weights 15*8 + 30 = 150; writes 4*2*5 outputs and h_n 10; 3 transcendentals per unit.
    assert roofline.layer_work("gru", 4, 2, 3, 5, element_bytes=4) == Work(4 * 224, 1920, 120)


def test_decoder_step():
    # B=2, S=5, H=4, LSTM cell on [y; h~] (I = 8): 2*2*16*(8+4) = 768 FLOPs; reads x 16, s, c 16,
    # weights 16*12 + 32 = 224; writes s', c' 16; 5 transcendentals per unit: 40.
    # Attention: W_q s 2*2*16 = 64, v.tanh 2*10*4 = 80, context 80; combine W_c [c; s] 2*2*4*8 = 128;
    # reads K' and the values 2*2*5*4 = 80, W_q 16, v and b 8, W_c 32; writes h~ 8 and the weights 10;
    # tanh per pair and feature 40, exp per pair 10, tanh of h~ 8.  h~ is read once, in [y; h~].
    work = roofline.decoder_step_work(2, 5, 4, element_bytes=4)
    assert work == Work(4 * (16 + 16 + 224 + 16 + 80 + 16 + 8 + 32 + 8 + 10), 768 + 64 + 160 + 128, 40 + 40 + 10 + 8)


def test_greedy_decoding_is_tokens_times_a_step_and_a_projection():
    step = roofline.decoder_step_work(2, 5, 4, element_bytes=4)
    projection = Work(4 * (7 * 4 + 7 + 2 * 4 + 2 * 7), 2 * 2 * 4 * 7, 0)
    assert roofline.greedy_decoding_work(3, 2, 5, 4, 7, element_bytes=4) == (step + projection).times(3)


def test_unknown_score_is_refused():
    with pytest.raises(ValueError, match="score must be one of"):
        roofline.attention_work("bilinear", 1, 1, 1, 1, element_bytes=4)


def test_lower_bound_takes_the_slowest_resource():
    limits = DeviceLimits("test card", bandwidth=100.0, flops={"float32": 1000.0}, transcendentals=10.0)
    assert limits.lower_bound_s(Work(200, 500, 5), "float32") == (2.0, "memory")
    assert limits.lower_bound_s(Work(100, 5000, 5), "float32") == (5.0, "compute")
    assert limits.lower_bound_s(Work(100, 500, 50), "float32") == (5.0, "special functions")
    assert limits.lower_bound_s(Work(100, 5000, 5), "float64") == (1.0, "memory")  # no float64 peak
    assert roofline.percent_of_limit(Work(200, 500, 5), limits, "float32", 4.0) == (50.0, "memory")
    with pytest.raises(ValueError, match="measured_s"):
        roofline.percent_of_limit(Work(1, 1, 1), limits, "float32", 0.0)


def test_percent_of_each_resource_whatever_bounds_the_work():
    limits = DeviceLimits("test card", bandwidth=100.0, flops={"float32": 1000.0}, transcendentals=10.0)
    work = Work(200, 500, 5)  # 2 s of memory, 0.5 s of compute, 0.5 s of special functions
    assert roofline.percent_of_each(work, limits, "float32", 4.0) == {"memory": 50.0, "compute": 12.5, "special functions": 12.5}
    assert roofline.percent_of_each(work, limits, "float64", 4.0) == {"memory": 50.0, "special functions": 12.5}
    assert roofline.percent_of_each(work, roofline.cpu_limits(100.0), "float32", 4.0) == {"memory": 50.0}
    with pytest.raises(ValueError, match="measured_s"):
        roofline.percent_of_each(work, limits, "float32", float("inf"))


@pytest.mark.parametrize(
    "device_name, card",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-40GB", "A100 SXM 40GB"),
        ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"),
        ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"),
        ("NVIDIA A100-PCIE-40GB", "A100 PCIe 40GB"),
    ],
)
def test_cards_are_recognised_by_name(device_name, card):
    assert roofline.known_gpu(device_name).name == card


@pytest.mark.parametrize("device_name", ["NVIDIA GeForce RTX 4090", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA GH200 480GB"])
def test_unknown_card_is_none(device_name):
    """Variants whose names contain a listed chip's (other bandwidth, clocks or memory) are
    not rated as that chip: "GH200" contains "H200", and the NVL boards say H100 / H200."""
    assert roofline.known_gpu(device_name) is None


def test_card_figures():
    h100 = roofline.KNOWN_GPUS["H100 SXM"]
    assert h100.bandwidth == 3.35e12 and h100.flops["bfloat16"] == pytest.approx(989.4e12)
    assert h100.transcendentals == pytest.approx(16 * 132 * 1.98e9)
    assert roofline.KNOWN_GPUS["H200"].bandwidth == 4.8e12
    assert h100.flops["float32"] == pytest.approx(66.9e12)  # CUDA cores: torch's float32 default
    assert roofline.float32_on_tf32(h100).flops["float32"] == pytest.approx(494.7e12)
    assert roofline.float32_on_tf32(h100).flops["bfloat16"] == h100.flops["bfloat16"]
    assert roofline.cpu_limits(2e10).lower_bound_s(Work(4e10, 1e15, 1e15), "float32") == (2.0, "memory")
