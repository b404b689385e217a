// The autocast kernels of the fastattn ops that compute (TORCH_LIBRARY_IMPL(fastattn,
// AutocastCPU / AutocastCUDA, m)): attention_forward, hard_attention_outputs,
// lstm_cell_forward, gru_cell_forward, lstm_layer_forward and gru_layer_forward.  Inside
// torch.autocast each casts its floating-point tensors to the autocast dtype (float16 or
// bfloat16; the CPU and CUDA kernels both run them natively) and calls the op below autocast
// (autograd records the casts, so gradients reach the float32 parameters), as torch's
// own autocast kernels do for matmul, SDPA and the RNNs on either device.
// at::autocast::cached_cast casts each float32 parameter (a leaf that requires grad) once
// per autocast region, as torch does, so a decoder's weights are not cast again every
// step.  float64 tensors, integer lengths and bool masks pass unchanged.  The backward
// ops need none: autograd calls them outside autocast, on the tensors the forward saved.
// autocast_cast exposes that cached cast as an op, for the Triton backend's casts.
#include "op_handles.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fastattn {
namespace {

using at::Tensor;
using std::optional;
using namespace ops;

// For the lifetime of one autocast kernel: autocast off for the op it calls, and the
// cast of its tensors.
template <c10::DeviceType kDevice>
class AutocastCall {
 public:
  Tensor operator()(const Tensor& tensor) const { return at::autocast::cached_cast(dtype_, tensor, kDevice); }
  optional<Tensor> operator()(const optional<Tensor>& tensor) const {
    return at::autocast::cached_cast(dtype_, tensor, kDevice);
  }

 private:
  c10::impl::ExcludeDispatchKeyGuard no_autocast_{at::autocast::get_autocast_dispatch_key_from_device_type(kDevice)};
  at::ScalarType dtype_ = at::autocast::get_autocast_dtype(kDevice);
};

// Local-p window centers are positions, not activations: float32 (float64 passes, as
// above), which a query of every autocast dtype takes (center_dtype.h), where a 16-bit
// p_t past 256 would be off by one.
optional<Tensor> center_in_float(const optional<Tensor>& center) {
  if (!center.has_value() || center->scalar_type() == at::kDouble) return center;
  return center->to(at::kFloat);
}

template <c10::DeviceType kDevice>
std::tuple<Tensor, Tensor, Tensor> attention_forward_autocast(
    const Tensor& query, const Tensor& keys, const Tensor& values, const optional<Tensor>& v,
    const optional<Tensor>& bias, c10::string_view score, double scale, const optional<Tensor>& lengths,
    const optional<Tensor>& key_padding_mask, bool causal, optional<int64_t> window, const optional<Tensor>& center,
    bool gaussian, bool return_weights) {
  static const auto op = fastattn_op<AttentionForward>("fastattn::attention_forward");
  const AutocastCall<kDevice> cast;
  return op.call(cast(query), cast(keys), cast(values), cast(v), cast(bias), score, scale, lengths, key_padding_mask,
                 causal, window, center_in_float(center), gaussian, return_weights);
}

// Hard attention's context, the chosen value rows, in the autocast dtype as soft
// attention's context is (the index passes).
template <c10::DeviceType kDevice>
std::tuple<Tensor, Tensor> hard_attention_outputs_autocast(const Tensor& weights, const Tensor& index,
                                                           const Tensor& values) {
  static const auto op = fastattn_op<HardAttentionOutputs>("fastattn::hard_attention_outputs");
  const AutocastCall<kDevice> cast;
  return op.call(cast(weights), index, cast(values));
}

template <c10::DeviceType kDevice>
std::tuple<Tensor, Tensor, Tensor> lstm_cell_forward_autocast(const Tensor& x, const Tensor& h, const Tensor& c,
                                                              const Tensor& w_ih, const Tensor& w_hh,
                                                              const optional<Tensor>& b_ih,
                                                              const optional<Tensor>& b_hh) {
  static const auto op = fastattn_op<LstmCellForward>("fastattn::lstm_cell_forward");
  const AutocastCall<kDevice> cast;
  return op.call(cast(x), cast(h), cast(c), cast(w_ih), cast(w_hh), cast(b_ih), cast(b_hh));
}

template <c10::DeviceType kDevice>
std::tuple<Tensor, Tensor> gru_cell_forward_autocast(const Tensor& x, const Tensor& h, const Tensor& w_ih,
                                                     const Tensor& w_hh, const optional<Tensor>& b_ih,
                                                     const optional<Tensor>& b_hh) {
  static const auto op = fastattn_op<GruCellForward>("fastattn::gru_cell_forward");
  const AutocastCall<kDevice> cast;
  return op.call(cast(x), cast(h), cast(w_ih), cast(w_hh), cast(b_ih), cast(b_hh));
}

template <c10::DeviceType kDevice>
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_layer_forward_autocast(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const optional<Tensor>& b_ih, const optional<Tensor>& b_hh, const optional<Tensor>& lengths, bool reverse) {
  static const auto op = fastattn_op<LstmLayerForward>("fastattn::lstm_layer_forward");
  const AutocastCall<kDevice> cast;
  return op.call(cast(x), cast(h0), cast(c0), cast(w_ih), cast(w_hh), cast(b_ih), cast(b_hh), lengths, reverse);
}

template <c10::DeviceType kDevice>
std::tuple<Tensor, Tensor, Tensor> gru_layer_forward_autocast(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                                              const Tensor& w_hh, const optional<Tensor>& b_ih,
                                                              const optional<Tensor>& b_hh,
                                                              const optional<Tensor>& lengths, bool reverse) {
  static const auto op = fastattn_op<GruLayerForward>("fastattn::gru_layer_forward");
  const AutocastCall<kDevice> cast;
  return op.call(cast(x), cast(h0), cast(w_ih), cast(w_hh), cast(b_ih), cast(b_hh), lengths, reverse);
}

template <c10::DeviceType kDevice>
void register_autocast(torch::Library& m) {
  m.impl("attention_forward", TORCH_FN(attention_forward_autocast<kDevice>));
  m.impl("hard_attention_outputs", TORCH_FN(hard_attention_outputs_autocast<kDevice>));
  m.impl("lstm_cell_forward", TORCH_FN(lstm_cell_forward_autocast<kDevice>));
  m.impl("gru_cell_forward", TORCH_FN(gru_cell_forward_autocast<kDevice>));
  m.impl("lstm_layer_forward", TORCH_FN(lstm_layer_forward_autocast<kDevice>));
  m.impl("gru_layer_forward", TORCH_FN(gru_layer_forward_autocast<kDevice>));
}

// autocast_cast (csrc/ops.cpp): the autocast dtype of the tensor's device, cached; the
// tensor itself outside autocast (nothing enters torch's cache there, which only the
// end of an autocast region clears).
Tensor autocast_cast(const Tensor& tensor) {
  const c10::DeviceType device = tensor.device().type();
  if (!at::autocast::is_autocast_enabled(device)) return tensor;
  return at::autocast::cached_cast(at::autocast::get_autocast_dtype(device), tensor, device);
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CompositeImplicitAutograd, m) { m.impl("autocast_cast", &fastattn::autocast_cast); }

TORCH_LIBRARY_IMPL(fastattn, AutocastCPU, m) { fastattn::register_autocast<c10::DeviceType::CPU>(m); }

TORCH_LIBRARY_IMPL(fastattn, AutocastCUDA, m) { fastattn::register_autocast<c10::DeviceType::CUDA>(m); }
