// attention_decoder_step: one step of fastattn.nn.AttentionDecoderCell as one op.
//
// Composes the fastattn ops attention_forward and lstm_cell_forward / gru_cell_forward
// with ATen's GEMMs, in the order of the Luong (input feeding) or Bahdanau step:
//   input feeding:  s_t = cell([y; h~_{t-1}], s_{t-1});  c_t = attend(s_t)
//   Bahdanau:       c_t = attend(s_{t-1});  s_t = cell([y; c_t], s_{t-1})
//   output          h~_t = tanh(W_c [c_t; s_t])
// attend(s) = attention_forward(s @ query_weight or s, keys, values, ...) over one query.
// It is registered as CompositeImplicitAutograd: gradients and fake tensors come from
// the ops it calls, so it has no backward of its own and runs on any device whose
// kernels those ops have.  What it saves is the per-step Python of the composed module
// (argument folding and checks, three module calls, concatenations); with grad mode
// off it also skips the autograd wrappers of the ops it calls.
// For CUDA tensors when no gradient is recorded it calls attention_decoder_step_inference
// instead, whose CUDA kernel (csrc/cuda/binding.cpp, decoder_step.cu) runs the step in
// one launch where it covers it; that op's other kernels are the composed step below.
// Local-p attention predicts the window's centre from the state the query is made of
// (Luong 2015, eq. 9) and passes it to attention_forward with the Gaussian.
// Does not handle: local-m windows (a single step carries no position t), image-grid
// keys (fastattn/ops/decoder_step.py flattens them).  float16 / bfloat16 go to the ops
// it calls, which take them on the CPU and on CUDA.
#include "decoder_step.h"
#include "cpu/tile_gemm.h"
#include "op_handles.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace fastattn {

void check_step_attention(c10::string_view score, double scale, const std::optional<int64_t>& window,
                          const std::optional<at::Tensor>& position_weight, const std::optional<at::Tensor>& position_v) {
  TORCH_CHECK_VALUE(score != "additive" || scale == 1.0,
                    "attention_decoder_step: scale must be 1 with score \"additive\" (v . tanh(q + k + bias) has "
                    "none), got ", scale);
  const bool any = window.has_value() || position_weight.has_value() || position_v.has_value();
  TORCH_CHECK_VALUE(!any || (window.has_value() && position_weight.has_value() && position_v.has_value()),
                    "attention_decoder_step: local-p attention needs window, position_weight and position_v together "
                    "(a single step carries no position t for a local-m window: mask the keys instead)");
  TORCH_CHECK_VALUE(!window.has_value() || *window >= 1,
                    "attention_decoder_step: window must be >= 1 (the Gaussian's sigma is window / 2), got ",
                    window.value_or(0));
}

namespace {

using at::Tensor;
using std::optional;

using namespace ops;

// Whether `tensor` is a CPU tensor whose memory a kernel may read: not a tensor subclass
// (FakeTensor while torch.compile traces this composite op), a functionalization or a
// torch.func wrapper.
bool plain_cpu(const Tensor& tensor) {
  static const c10::DispatchKeySet wrappers({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                             c10::DispatchKey::FuncTorchBatched,
                                             c10::DispatchKey::FuncTorchGradWrapper});
  return tensor.is_cpu() && !tensor.key_set().has_any(wrappers);
}

// x (rows, K) @ w (N, K)^T, as at::linear(x, w).  Plain CPU tensors of one dtype go to
// matmul_transposed_into (csrc/cpu/tile_gemm.h: a few float32 rows skip ATen's GEMM call)
// when no gradient is recorded and autocast is off (at::linear would cast under it).
Tensor times_transposed(const Tensor& x, const Tensor& w, bool records_gradients) {
  if (records_gradients || x.dim() != 2 || x.scalar_type() != w.scalar_type() || !plain_cpu(x) || !plain_cpu(w) ||
      at::autocast::is_autocast_enabled(at::kCPU)) {
    return at::linear(x, w);
  }
  Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  matmul_transposed_into(out, x.contiguous(), w);
  return out;
}

struct StepAttention {
  const Tensor& keys;
  const Tensor& values;
  const optional<Tensor>& query_weight;
  const optional<Tensor>& v;
  const optional<Tensor>& bias;
  c10::string_view score;
  double scale;
  const optional<Tensor>& lengths;
  const optional<Tensor>& key_padding_mask;
  optional<int64_t> window;  // local-p, with the two below
  const optional<Tensor>& position_weight;
  const optional<Tensor>& position_v;
  bool records_gradients;

  // -> (context (B, Dv), weights (B, S)) for the decoder state s (B, H).
  std::tuple<Tensor, Tensor> operator()(const Tensor& state) const {
    static const auto attention_forward = fastattn_op<AttentionForward>("fastattn::attention_forward");
    const Tensor query =
        query_weight.has_value() ? times_transposed(state, query_weight->t(), records_gradients) : state.contiguous();
    const optional<Tensor> center = window.has_value() ? optional<Tensor>(predicted_center(state)) : std::nullopt;
    auto [context, weights, logsumexp] = attention_forward.call(
        query.unsqueeze(1), keys, values, v, bias, score, scale, lengths, key_padding_mask, false, window, center,
        window.has_value(), true);
    return {context.squeeze(1), weights.squeeze(1)};
  }

  // p_t = S_b sigmoid(v_p . tanh(s W_p^T)) (B, 1), S_b row b's length or S, in float32 at
  // least (center_dtype.h).
  Tensor predicted_center(const Tensor& state) const {
    const Tensor logit = at::matmul(at::tanh(at::matmul(state, *position_weight)), *position_v);
    const Tensor fraction = at::sigmoid(logit.to(at::promote_types(logit.scalar_type(), at::kFloat)));
    const Tensor center = lengths.has_value() ? fraction * lengths->to(fraction.scalar_type())
                                              : fraction * static_cast<double>(keys.size(1));
    return center.unsqueeze(1);
  }
};

// -> (s_t, LSTM memory c_t or an empty tensor for a GRU).
std::tuple<Tensor, Tensor> cell_step(
    const Tensor& x, const Tensor& h, const optional<Tensor>& c, const Tensor& w_ih, const Tensor& w_hh,
    const optional<Tensor>& b_ih, const optional<Tensor>& b_hh) {
  if (c.has_value()) {
    static const auto lstm_cell_forward = fastattn_op<LstmCellForward>("fastattn::lstm_cell_forward");
    auto [h_next, c_next, saved] = lstm_cell_forward.call(x, h, *c, w_ih, w_hh, b_ih, b_hh);
    return {h_next, c_next};
  }
  static const auto gru_cell_forward = fastattn_op<GruCellForward>("fastattn::gru_cell_forward");
  auto [h_next, saved] = gru_cell_forward.call(x, h, w_ih, w_hh, b_ih, b_hh);
  return {h_next, x.new_empty({0})};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> decoder_step(
    const Tensor& y, const Tensor& h, const optional<Tensor>& c, const Tensor& attentional, const StepAttention& attend,
    const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
    const Tensor& w_combine, bool input_feeding) {
  Tensor context, weights, h_next, c_next;
  if (input_feeding) {
    std::tie(h_next, c_next) = cell_step(at::cat({y, attentional}, -1), h, c, w_ih, w_hh, b_ih, b_hh);
    std::tie(context, weights) = attend(h_next);
  } else {
    std::tie(context, weights) = attend(h);
    std::tie(h_next, c_next) = cell_step(at::cat({y, context}, -1), h, c, w_ih, w_hh, b_ih, b_hh);
  }
  Tensor output = at::tanh(times_transposed(at::cat({context, h_next}, -1), w_combine, attend.records_gradients));
  return {output, h_next, c_next, weights};
}

bool requires_grad(const optional<Tensor>& tensor) { return tensor.has_value() && tensor->requires_grad(); }

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_decoder_step(
    const Tensor& y, const Tensor& h, const optional<Tensor>& c, const Tensor& attentional, const Tensor& keys,
    const Tensor& values, const optional<Tensor>& query_weight, const optional<Tensor>& v,
    const optional<Tensor>& bias, c10::string_view score, double scale, const optional<Tensor>& lengths,
    const optional<Tensor>& key_padding_mask, const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
    const Tensor& w_combine, bool input_feeding, optional<int64_t> window, const optional<Tensor>& position_weight,
    const optional<Tensor>& position_v) {
  check_step_attention(score, scale, window, position_weight, position_v);
  const bool records_gradients =
      at::GradMode::is_enabled() &&
      (y.requires_grad() || h.requires_grad() || requires_grad(c) || attentional.requires_grad() ||
       keys.requires_grad() || values.requires_grad() || requires_grad(query_weight) || requires_grad(v) ||
       requires_grad(bias) || w_ih.requires_grad() || w_hh.requires_grad() || requires_grad(b_ih) ||
       requires_grad(b_hh) || w_combine.requires_grad() || requires_grad(position_weight) ||
       requires_grad(position_v));
  if (y.is_cuda() && !records_gradients) {
    static const auto inference = fastattn_op<DecoderStep>("fastattn::attention_decoder_step_inference");
    return inference.call(y, h, c, attentional, keys, values, query_weight, v, bias, score, scale, lengths,
                          key_padding_mask, w_ih, w_hh, b_ih, b_hh, w_combine, input_feeding, window, position_weight,
                          position_v);
  }
  const StepAttention attend{keys, values, query_weight, v, bias, score, scale, lengths, key_padding_mask,
                             window, position_weight, position_v, records_gradients};
  if (at::GradMode::is_enabled()) {
    return decoder_step(y, h, c, attentional, attend, w_ih, w_hh, b_ih, b_hh, w_combine, input_feeding);
  }
  // No gradients are recorded, so the ops below may skip their autograd kernels.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return decoder_step(y, h, c, attentional, attend, w_ih, w_hh, b_ih, b_hh, w_combine, input_feeding);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> composed_decoder_step_inference(
    const Tensor& y, const Tensor& h, const optional<Tensor>& c, const Tensor& attentional, const Tensor& keys,
    const Tensor& values, const optional<Tensor>& query_weight, const optional<Tensor>& v,
    const optional<Tensor>& bias, c10::string_view score, double scale, const optional<Tensor>& lengths,
    const optional<Tensor>& key_padding_mask, const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
    const optional<Tensor>& b_hh, const Tensor& w_combine, bool input_feeding, optional<int64_t> window,
    const optional<Tensor>& position_weight, const optional<Tensor>& position_v) {
  check_step_attention(score, scale, window, position_weight, position_v);
  const StepAttention attend{keys, values, query_weight, v, bias, score, scale, lengths, key_padding_mask,
                             window, position_weight, position_v, /*records_gradients=*/false};
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // an inference op: no gradients
  return decoder_step(y, h, c, attentional, attend, w_ih, w_hh, b_ih, b_hh, w_combine, input_feeding);
}

}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CompositeImplicitAutograd, m) {
  m.impl("attention_decoder_step", &fastattn::attention_decoder_step);
}

// Every backend without a kernel of its own (the CPU, CUDA builds without csrc/cuda)
// composes the inference step.
TORCH_LIBRARY_IMPL(fastattn, CompositeExplicitAutograd, m) {
  m.impl("attention_decoder_step_inference", &fastattn::composed_decoder_step_inference);
}
