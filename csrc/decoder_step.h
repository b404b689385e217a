// decoder_step.h: the composed attention-decoder step of csrc/decoder_step.cpp without
// autograd, for the CUDA binding's inference op to fall back on where its one-launch
// kernel does not cover the step (csrc/cuda/binding.cpp).  Arguments and outputs: those
// of attention_decoder_step (csrc/ops.cpp), and the check of its attention arguments.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace fastattn {

// Raises unless scale is 1 for the additive score, and window, position_weight and
// position_v (local-p) come together or not at all, window >= 1.
void check_step_attention(c10::string_view score, double scale, const std::optional<int64_t>& window,
                          const std::optional<at::Tensor>& position_weight, const std::optional<at::Tensor>& position_v);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> composed_decoder_step_inference(
    const at::Tensor& y, const at::Tensor& h, const std::optional<at::Tensor>& c, const at::Tensor& attentional,
    const at::Tensor& keys, const at::Tensor& values, const std::optional<at::Tensor>& query_weight,
    const std::optional<at::Tensor>& v, const std::optional<at::Tensor>& bias, c10::string_view score, double scale,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& key_padding_mask,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const at::Tensor& w_combine, bool input_feeding,
    std::optional<int64_t> window, const std::optional<at::Tensor>& position_weight,
    const std::optional<at::Tensor>& position_v);

}  // namespace fastattn
