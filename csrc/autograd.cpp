// The autograd kernels of the differentiable fastattn ops (TORCH_LIBRARY_IMPL(fastattn,
// Autograd, m)): attention_forward, hard_attention_outputs, lstm_cell_forward, gru_cell_forward,
// lstm_layer_forward and gru_layer_forward, each a torch::autograd::Function whose
// forward calls the op below autograd (the CPU or CUDA kernel, or the fake one under
// torch.compile) and whose backward calls the op's *_backward, for every device.
// In C++ rather than torch.library.register_autograd because that path runs Python
// around every call and its backward: measured on two cores, fastattn.attention on a
// small problem (B=2, T=3, S=5, D=8) with gradients took ~105 us forward and ~215 us
// forward+backward with it, 38 us and 123 us with these (the two ops alone: ~20 us),
// a cost that a decoder trained one step at a time pays on every step.
// What each saves and how absent output gradients are handled is what the kernels'
// backward ops take (csrc/ops.cpp): every forward sets materialize_grads off, so that
// autograd never makes a zero gradient on its own (the recurrent ops' `saved` output
// holds the gate activations of every step); an absent gradient of a real output is
// passed as zeros, except the attention weights', which is passed as none.
// Gradients of gradients: the *_backward kernels are not differentiable.  When a
// backward must be (torch.autograd.grad(..., create_graph=True): gradient penalties,
// Hessian-vector products, meta-learning), each backward below takes its gradients
// instead from the op's differentiable form, fastattn::<op>_reference (fastattn.
// reference's PyTorch, fastattn/ops/higher_order.py), recomputed from the saved inputs
// and differentiated with a graph: right to any order, at the reference's speed, and
// only then.
#include "op_handles.h"

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fastattn {
namespace {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using namespace ops;

Tensor or_undefined(const optional<Tensor>& tensor) { return tensor.has_value() ? *tensor : Tensor(); }

// A mask as it is now (lengths, key_padding_mask), for a backward that will run: the caller
// may change its own in place before then (a decoder masking the keys it has attended to),
// as torch's sdpa and MultiheadAttention allow.  No copy when no input needs a gradient.
Tensor copy_for_backward(const optional<Tensor>& tensor, bool backward_runs) {
  return backward_runs && tensor.has_value() && tensor->defined() ? tensor->clone() : or_undefined(tensor);
}

optional<Tensor> or_none(const Tensor& tensor) { return tensor.defined() ? optional<Tensor>(tensor) : std::nullopt; }

// An output's gradient, contiguous, or zeros like `like` when autograd gave none.
Tensor contiguous_or_zeros(const Tensor& grad, const Tensor& like) {
  return grad.defined() ? grad.contiguous() : at::zeros_like(like);
}

// A gradient of an optional input: undefined (None) when the input was absent.
Tensor if_present(const Tensor& grad, const Tensor& input) { return input.defined() ? grad : Tensor(); }

// Whether this backward must itself be differentiable: autograd records it
// (create_graph=True) and some input of the forward needs a gradient.
bool any_requires_grad(const variable_list& inputs) {
  for (const Tensor& input : inputs) {
    if (input.defined() && input.requires_grad()) return true;
  }
  return false;
}

bool graph_wanted(const variable_list& inputs) { return at::GradMode::is_enabled() && any_requires_grad(inputs); }

// Whether a forward needs its autograd Function: graph_wanted, or an input carries a
// forward-mode tangent (which the Function refuses: it has no jvp; without it the tangent
// would be dropped silently).
bool autograd_needed(const variable_list& inputs) {
  if (graph_wanted(inputs)) return true;
  for (const Tensor& input : inputs) {
    if (input.defined() && input._fw_grad(/*level=*/0).defined()) return true;
  }
  return false;
}

// The forward ops' handles, and a call of one below autograd: the CPU or CUDA kernel, or
// the fake one under torch.compile.  Each wrapper at the bottom calls it directly unless
// autograd_needed (so in inference, or when no input needs a gradient): torch::autograd::Function's
// apply costs ~2.3 us a call even then, a third of a small decode step's attention op.
template <typename Signature, const char* kName>
const c10::TypedOperatorHandle<Signature>& op_handle() {
  static const auto op = fastattn_op<Signature>(kName);
  return op;
}
constexpr char kAttentionForward[] = "fastattn::attention_forward";
constexpr char kHardAttentionOutputs[] = "fastattn::hard_attention_outputs";
constexpr char kLstmCellForward[] = "fastattn::lstm_cell_forward";
constexpr char kGruCellForward[] = "fastattn::gru_cell_forward";
constexpr char kLstmLayerForward[] = "fastattn::lstm_layer_forward";
constexpr char kGruLayerForward[] = "fastattn::gru_layer_forward";
const auto& attention_forward_op() { return op_handle<AttentionForward, kAttentionForward>(); }
const auto& hard_attention_outputs_op() { return op_handle<HardAttentionOutputs, kHardAttentionOutputs>(); }
const auto& lstm_cell_forward_op() { return op_handle<LstmCellForward, kLstmCellForward>(); }
const auto& gru_cell_forward_op() { return op_handle<GruCellForward, kGruCellForward>(); }
const auto& lstm_layer_forward_op() { return op_handle<LstmLayerForward, kLstmLayerForward>(); }
const auto& gru_layer_forward_op() { return op_handle<GruLayerForward, kGruLayerForward>(); }

template <typename Signature, typename... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Signature>& op, const Args&... args) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(args...);
}

// The gradients of `inputs` (the forward's arguments in order, undefined where an
// argument is no tensor or needs no gradient) through fastattn::<reference_op> called
// on `arguments` (the forward's first arguments, in its order), whose first outputs
// are the forward's, weighted by `grads` (undefined: that output's gradient is zero),
// recorded for a further backward.  Each input enters as an alias of its own, so that
// a tensor passed twice (keys as the values) gets each use's gradient once, as the
// kernels' backward gives it.
variable_list gradients_through_reference(const char* reference_op, std::vector<c10::IValue> arguments,
                                          const variable_list& grads, const variable_list& inputs) {
  variable_list wanted;
  std::vector<size_t> positions;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (inputs[i].defined() && inputs[i].requires_grad()) {
      wanted.push_back(inputs[i].view_as(inputs[i]));
      arguments[i] = wanted.back();
      positions.push_back(i);
    }
  }
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(reference_op, "");
  op.callBoxed(&arguments);  // the outputs replace the arguments on the stack
  variable_list outputs, weights;
  for (size_t i = 0; i < arguments.size() && i < grads.size(); ++i) {
    const Tensor output = arguments[i].toTensor();
    if (grads[i].defined() && output.requires_grad()) {
      outputs.push_back(output);
      weights.push_back(grads[i]);
    }
  }
  variable_list result(inputs.size());
  if (outputs.empty()) return result;
  const variable_list gradients = torch::autograd::grad(outputs, wanted, weights, /*retain_graph=*/true,
                                                        /*create_graph=*/true, /*allow_unused=*/true);
  for (size_t k = 0; k < positions.size(); ++k) result[positions[k]] = gradients[k];
  return result;
}

// ---------------------------------------------------------------- attention_forward

struct Attention : public torch::autograd::Function<Attention> {
  static variable_list forward(AutogradContext* ctx, const Tensor& query, const Tensor& keys, const Tensor& values,
                               const optional<Tensor>& v, const optional<Tensor>& bias, const std::string& score,
                               double scale, const optional<Tensor>& lengths,
                               const optional<Tensor>& key_padding_mask, bool causal, optional<int64_t> window,
                               const optional<Tensor>& center, bool gaussian, bool return_weights) {
    auto [context, weights, logsumexp] =
        call_below_autograd(attention_forward_op(), query, keys, values, v, bias, c10::string_view(score), scale,
                            lengths, key_padding_mask, causal, window, center, gaussian, return_weights);
    ctx->set_materialize_grads(false);
    const bool backward_runs =
        any_requires_grad({query, keys, values, or_undefined(v), or_undefined(bias), or_undefined(center)});
    ctx->save_for_backward({query, keys, values, or_undefined(v), or_undefined(bias),
                            copy_for_backward(lengths, backward_runs), copy_for_backward(key_padding_mask, backward_runs),
                            or_undefined(center), logsumexp});
    ctx->saved_data["score"] = score;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["window"] = window;
    ctx->saved_data["gaussian"] = gaussian;
    ctx->saved_data["return_weights"] = return_weights;
    // One tensor as keys and values (Bahdanau's h_j): the backward writes its one gradient,
    // where two, added here by autograd, cost a second write and a pass over both.
    ctx->saved_data["values_are_keys"] = keys.is_same(values);
    ctx->mark_non_differentiable({logsumexp});
    return {context, weights, logsumexp};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = fastattn_op<AttentionBackward>("fastattn::attention_backward");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &query = saved[0], &keys = saved[1], &values = saved[2], &v = saved[3], &bias = saved[4];
    const Tensor &lengths = saved[5], &key_padding_mask = saved[6], &center = saved[7];
    const Tensor& logsumexp = saved[8];
    const auto& data = ctx->saved_data;
    const bool gaussian = data.at("gaussian").toBool();
    const bool return_weights = data.at("return_weights").toBool();
    const optional<Tensor> grad_weights =
        return_weights && grads[1].defined() ? optional<Tensor>(grads[1].contiguous()) : std::nullopt;
    const optional<int64_t> window = data.at("window").toOptional<int64_t>();
    const Tensor none;
    const variable_list inputs = {query, keys, values, v, bias, none, none, none, none, none, none,
                                  gaussian ? center : none, none, none};
    if (graph_wanted(inputs)) {
      return gradients_through_reference(
          "fastattn::attention_reference",
          {query, keys, values, or_none(v), or_none(bias), data.at("score"), data.at("scale"), or_none(lengths),
           or_none(key_padding_mask), data.at("causal"), window, or_none(center), gaussian},
          {grads[0], return_weights ? grads[1] : none}, inputs);
    }
    const Tensor grad_context =  // zeros (N, T, Dv) when only the weights have a gradient
        grads[0].defined() ? grads[0].contiguous()
                           : at::zeros({logsumexp.size(0), logsumexp.size(1), values.size(2)}, query.options());
    const bool values_are_keys = data.at("values_are_keys").toBool();
    auto [grad_query, grad_keys, grad_values, grad_v, grad_bias, grad_center] =
        op.call(grad_context, grad_weights, query, keys, values, or_none(v), or_none(bias),
                data.at("score").toStringRef(), data.at("scale").toDouble(), or_none(lengths),
                or_none(key_padding_mask), data.at("causal").toBool(), window, or_none(center), gaussian, logsumexp,
                values_are_keys);
    return {grad_query, grad_keys, values_are_keys ? none : grad_values, if_present(grad_v, v),
            if_present(grad_bias, bias),
            none, none, none, none, none, none,
            gaussian ? if_present(grad_center, center) : none, none, none};
  }
};

std::tuple<Tensor, Tensor, Tensor> attention_forward_autograd(
    const Tensor& query, const Tensor& keys, const Tensor& values, const optional<Tensor>& v,
    const optional<Tensor>& bias, c10::string_view score, double scale, const optional<Tensor>& lengths,
    const optional<Tensor>& key_padding_mask, bool causal, optional<int64_t> window, const optional<Tensor>& center,
    bool gaussian, bool return_weights) {
  if (!autograd_needed({query, keys, values, or_undefined(v), or_undefined(bias), or_undefined(center)})) {
    return call_below_autograd(attention_forward_op(), query, keys, values, v, bias, score, scale, lengths,
                               key_padding_mask, causal, window, center, gaussian, return_weights);
  }
  const variable_list outputs = Attention::apply(query, keys, values, v, bias, std::string(score), scale, lengths,
                                                 key_padding_mask, causal, window, center, gaussian, return_weights);
  return {outputs[0], outputs[1], outputs[2]};
}

// ---------------------------------------------------------------- hard_attention_outputs

// index has no gradient.  The values are saved only when they need one: the backward kernel
// does not read them, and hard attention's caller may hold large ones it would free.
struct HardAttentionOutputs : public torch::autograd::Function<HardAttentionOutputs> {
  static variable_list forward(AutogradContext* ctx, const Tensor& weights, const Tensor& index,
                               const Tensor& values) {
    auto [context, log_prob] = call_below_autograd(hard_attention_outputs_op(), weights, index, values);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({weights, index, values.requires_grad() ? values : Tensor()});
    return {context, log_prob};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = fastattn_op<HardAttentionOutputsBackward>("fastattn::hard_attention_outputs_backward");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &weights = saved[0], &index = saved[1], &values = saved[2];
    const Tensor none;
    const variable_list inputs = {weights, none, values};
    if (graph_wanted(inputs)) {
      // Values that need no gradient enter as (N, S, 0): the reference's context is then empty.
      const Tensor values_or_empty =
          values.defined() ? values : weights.new_empty({weights.size(0), weights.size(2), 0});
      return gradients_through_reference("fastattn::hard_attention_outputs_reference",
                                         {weights, index, values_or_empty}, grads, inputs);
    }
    const Tensor grad_context = values.defined() ? grads[0] : none;
    auto [grad_weights, grad_values] = op.call(or_none(grad_context), or_none(grads[1]), weights, index);
    return {grads[1].defined() ? grad_weights : none, none, grad_context.defined() ? grad_values : none};
  }
};

std::tuple<Tensor, Tensor> hard_attention_outputs_autograd(const Tensor& weights, const Tensor& index,
                                                           const Tensor& values) {
  if (!autograd_needed({weights, values})) {
    return call_below_autograd(hard_attention_outputs_op(), weights, index, values);
  }
  const variable_list outputs = HardAttentionOutputs::apply(weights, index, values);
  return {outputs[0], outputs[1]};
}

// ---------------------------------------------------------------- LSTM / GRU cells

struct LstmCell : public torch::autograd::Function<LstmCell> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& h, const Tensor& c,
                               const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
                               const optional<Tensor>& b_hh) {
    auto [h_next, c_next, saved] = call_below_autograd(lstm_cell_forward_op(), x, h, c, w_ih, w_hh, b_ih, b_hh);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, h, c, w_ih, w_hh, or_undefined(b_ih), or_undefined(b_hh), c_next, saved});
    ctx->mark_non_differentiable({saved});
    return {h_next, c_next, saved};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = fastattn_op<LstmCellBackward>("fastattn::lstm_cell_backward");
    const variable_list s = ctx->get_saved_variables();
    const Tensor &b_ih = s[5], &b_hh = s[6], &c_next = s[7];
    const variable_list inputs(s.begin(), s.begin() + 7);
    if (graph_wanted(inputs)) {
      return gradients_through_reference("fastattn::lstm_cell_reference",
                                         {s[0], s[1], s[2], s[3], s[4], or_none(b_ih), or_none(b_hh)}, grads, inputs);
    }
    auto [grad_x, grad_h, grad_c, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh] =
        op.call(contiguous_or_zeros(grads[0], c_next), contiguous_or_zeros(grads[1], c_next), s[0], s[1], s[2], s[3],
                s[4], or_none(b_ih), or_none(b_hh), c_next, s[8]);
    return {grad_x, grad_h, grad_c, grad_w_ih, grad_w_hh, if_present(grad_b_ih, b_ih), if_present(grad_b_hh, b_hh)};
  }
};

struct GruCell : public torch::autograd::Function<GruCell> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& h, const Tensor& w_ih,
                               const Tensor& w_hh, const optional<Tensor>& b_ih, const optional<Tensor>& b_hh) {
    auto [h_next, saved] = call_below_autograd(gru_cell_forward_op(), x, h, w_ih, w_hh, b_ih, b_hh);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, h, w_ih, w_hh, or_undefined(b_ih), or_undefined(b_hh), saved});
    ctx->mark_non_differentiable({saved});
    return {h_next, saved};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = fastattn_op<GruCellBackward>("fastattn::gru_cell_backward");
    const variable_list s = ctx->get_saved_variables();
    const Tensor &h = s[1], &b_ih = s[4], &b_hh = s[5];
    const variable_list inputs(s.begin(), s.begin() + 6);
    if (graph_wanted(inputs)) {
      return gradients_through_reference("fastattn::gru_cell_reference",
                                         {s[0], h, s[2], s[3], or_none(b_ih), or_none(b_hh)}, grads, inputs);
    }
    auto [grad_x, grad_h, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh] =
        op.call(contiguous_or_zeros(grads[0], h), s[0], h, s[2], s[3], or_none(b_ih), or_none(b_hh), s[6]);
    return {grad_x, grad_h, grad_w_ih, grad_w_hh, if_present(grad_b_ih, b_ih), if_present(grad_b_hh, b_hh)};
  }
};

// ---------------------------------------------------------------- LSTM / GRU layers

struct LstmLayer : public torch::autograd::Function<LstmLayer> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& h0, const Tensor& c0,
                               const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
                               const optional<Tensor>& b_hh, const optional<Tensor>& lengths, bool reverse) {
    auto [output, h_n, c_n, saved] =
        call_below_autograd(lstm_layer_forward_op(), x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, h0, c0, w_ih, w_hh, or_undefined(b_ih), or_undefined(b_hh), or_undefined(lengths),
                            output, saved});
    ctx->saved_data["reverse"] = reverse;
    ctx->mark_non_differentiable({saved});
    return {output, h_n, c_n, saved};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = fastattn_op<LstmLayerBackward>("fastattn::lstm_layer_backward");
    const variable_list s = ctx->get_saved_variables();
    const Tensor &h0 = s[1], &c0 = s[2], &b_ih = s[5], &b_hh = s[6], &output = s[8];
    const bool reverse = ctx->saved_data.at("reverse").toBool();
    const Tensor none;
    const variable_list inputs = {s[0], h0, c0, s[3], s[4], b_ih, b_hh, none, none};
    if (graph_wanted(inputs)) {
      return gradients_through_reference(
          "fastattn::lstm_layer_reference",
          {s[0], h0, c0, s[3], s[4], or_none(b_ih), or_none(b_hh), or_none(s[7]), reverse}, grads, inputs);
    }
    auto [grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh] =
        op.call(contiguous_or_zeros(grads[0], output), contiguous_or_zeros(grads[1], h0),
                contiguous_or_zeros(grads[2], c0), s[0], h0, c0, s[3], s[4], or_none(b_ih), or_none(b_hh),
                or_none(s[7]), reverse, output, s[9]);
    return {grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, if_present(grad_b_ih, b_ih), if_present(grad_b_hh, b_hh),
            none, none};
  }
};

struct GruLayer : public torch::autograd::Function<GruLayer> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                               const Tensor& w_hh, const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
                               const optional<Tensor>& lengths, bool reverse) {
    auto [output, h_n, saved] =
        call_below_autograd(gru_layer_forward_op(), x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward(
        {x, h0, w_ih, w_hh, or_undefined(b_ih), or_undefined(b_hh), or_undefined(lengths), output, saved});
    ctx->saved_data["reverse"] = reverse;
    ctx->mark_non_differentiable({saved});
    return {output, h_n, saved};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = fastattn_op<GruLayerBackward>("fastattn::gru_layer_backward");
    const variable_list s = ctx->get_saved_variables();
    const Tensor &h0 = s[1], &b_ih = s[4], &b_hh = s[5], &output = s[7];
    const bool reverse = ctx->saved_data.at("reverse").toBool();
    const Tensor none;
    const variable_list inputs = {s[0], h0, s[2], s[3], b_ih, b_hh, none, none};
    if (graph_wanted(inputs)) {
      return gradients_through_reference(
          "fastattn::gru_layer_reference",
          {s[0], h0, s[2], s[3], or_none(b_ih), or_none(b_hh), or_none(s[6]), reverse}, grads, inputs);
    }
    auto [grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh] =
        op.call(contiguous_or_zeros(grads[0], output), contiguous_or_zeros(grads[1], h0), s[0], h0, s[2], s[3],
                or_none(b_ih), or_none(b_hh), or_none(s[6]), reverse, output, s[8]);
    return {grad_x, grad_h0, grad_w_ih, grad_w_hh, if_present(grad_b_ih, b_ih), if_present(grad_b_hh, b_hh), none,
            none};
  }
};

// ---------------------------------------------------------------- registration

std::tuple<Tensor, Tensor, Tensor> lstm_cell_forward_autograd(const Tensor& x, const Tensor& h, const Tensor& c,
                                                              const Tensor& w_ih, const Tensor& w_hh,
                                                              const optional<Tensor>& b_ih,
                                                              const optional<Tensor>& b_hh) {
  if (!autograd_needed({x, h, c, w_ih, w_hh, or_undefined(b_ih), or_undefined(b_hh)})) {
    return call_below_autograd(lstm_cell_forward_op(), x, h, c, w_ih, w_hh, b_ih, b_hh);
  }
  const variable_list outputs = LstmCell::apply(x, h, c, w_ih, w_hh, b_ih, b_hh);
  return {outputs[0], outputs[1], outputs[2]};
}

std::tuple<Tensor, Tensor> gru_cell_forward_autograd(const Tensor& x, const Tensor& h, const Tensor& w_ih,
                                                     const Tensor& w_hh, const optional<Tensor>& b_ih,
                                                     const optional<Tensor>& b_hh) {
  if (!autograd_needed({x, h, w_ih, w_hh, or_undefined(b_ih), or_undefined(b_hh)})) {
    return call_below_autograd(gru_cell_forward_op(), x, h, w_ih, w_hh, b_ih, b_hh);
  }
  const variable_list outputs = GruCell::apply(x, h, w_ih, w_hh, b_ih, b_hh);
  return {outputs[0], outputs[1]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_layer_forward_autograd(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const optional<Tensor>& b_ih, const optional<Tensor>& b_hh, const optional<Tensor>& lengths, bool reverse) {
  if (!autograd_needed({x, h0, c0, w_ih, w_hh, or_undefined(b_ih), or_undefined(b_hh)})) {
    return call_below_autograd(lstm_layer_forward_op(), x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse);
  }
  const variable_list outputs = LstmLayer::apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse);
  return {outputs[0], outputs[1], outputs[2], outputs[3]};
}

std::tuple<Tensor, Tensor, Tensor> gru_layer_forward_autograd(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                                              const Tensor& w_hh, const optional<Tensor>& b_ih,
                                                              const optional<Tensor>& b_hh,
                                                              const optional<Tensor>& lengths, bool reverse) {
  if (!autograd_needed({x, h0, w_ih, w_hh, or_undefined(b_ih), or_undefined(b_hh)})) {
    return call_below_autograd(gru_layer_forward_op(), x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse);
  }
  const variable_list outputs = GruLayer::apply(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse);
  return {outputs[0], outputs[1], outputs[2]};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, Autograd, m) {
  m.impl("attention_forward", &fastattn::attention_forward_autograd);
  m.impl("hard_attention_outputs", &fastattn::hard_attention_outputs_autograd);
  m.impl("lstm_cell_forward", &fastattn::lstm_cell_forward_autograd);
  m.impl("gru_cell_forward", &fastattn::gru_cell_forward_autograd);
  m.impl("lstm_layer_forward", &fastattn::lstm_layer_forward_autograd);
  m.impl("gru_layer_forward", &fastattn::gru_layer_forward_autograd);
}
