// The argument checks of hard_attention_outputs and its backward (schemas in csrc/ops.cpp),
// shared by their CPU kernels (csrc/cpu/hard_attention_outputs.cpp) and their CUDA binding
// (csrc/cuda/binding.cpp), so that both refuse the same calls with the same messages.
// Shapes, dtypes and devices only: the positions' range needs the index's values, which
// each device checks its own way.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastattn {

// tensor on a device of `device` with a float dtype.
inline void check_float_on(const char* op, const char* name, const at::Tensor& tensor, c10::DeviceType device) {
  TORCH_CHECK_VALUE(tensor.device().type() == device, op, ": ", name, " must be a ", c10::DeviceTypeName(device),
                    " tensor, got one on ", tensor.device());
  const at::ScalarType dtype = tensor.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

// weights (N, T, S) float and index (N, T) int64 on the weights' device.
inline void check_weights_and_index(const char* op, const at::Tensor& weights, const at::Tensor& index,
                                    c10::DeviceType device) {
  check_float_on(op, "weights", weights, device);
  TORCH_CHECK_VALUE(index.device() == weights.device(), op, ": index must be on ", weights.device(),
                    ", got a tensor on ", index.device());
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, op, ": index must be int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(weights.dim() == 3, op, ": weights must be (N, T, S), got shape ", weights.sizes());
  TORCH_CHECK_VALUE(index.dim() == 2 && index.size(0) == weights.size(0) && index.size(1) == weights.size(1), op,
                    ": index must be (N=", weights.size(0), ", T=", weights.size(1), "), got shape ", index.sizes());
}

// hard_attention_outputs(weights, index, values): values (N, S, Dv) of any float dtype (under
// autocast the weights are the low-precision ones).
inline void check_hard_attention_outputs(const char* op, const at::Tensor& weights, const at::Tensor& index,
                                         const at::Tensor& values, c10::DeviceType device) {
  check_weights_and_index(op, weights, index, device);
  check_float_on(op, "values", values, device);
  TORCH_CHECK_VALUE(values.device() == weights.device(), op, ": values must be on ", weights.device(),
                    ", got a tensor on ", values.device());
  TORCH_CHECK_VALUE(values.dim() == 3 && values.size(0) == weights.size(0) && values.size(1) == weights.size(2), op,
                    ": values must be (N=", weights.size(0), ", S=", weights.size(2), ", Dv), got shape ",
                    values.sizes());
}

// hard_attention_outputs_backward(grad_context, grad_log_prob, weights, index): grad_context
// (N, T, Dv) of any float dtype and grad_log_prob (N, T) of the weights' dtype, where given.
inline void check_hard_attention_outputs_backward(const char* op, const std::optional<at::Tensor>& grad_context,
                                                  const std::optional<at::Tensor>& grad_log_prob,
                                                  const at::Tensor& weights, const at::Tensor& index,
                                                  c10::DeviceType device) {
  check_weights_and_index(op, weights, index, device);
  const int64_t batch = weights.size(0), queries = weights.size(1);
  if (grad_context.has_value() && grad_context->defined()) {
    check_float_on(op, "grad_context", *grad_context, device);
    TORCH_CHECK_VALUE(grad_context->device() == weights.device(), op, ": grad_context must be on ", weights.device(),
                      ", got a tensor on ", grad_context->device());
    TORCH_CHECK_VALUE(grad_context->dim() == 3 && grad_context->size(0) == batch && grad_context->size(1) == queries,
                      op, ": grad_context must be (N=", batch, ", T=", queries, ", Dv), got shape ",
                      grad_context->sizes());
  }
  if (grad_log_prob.has_value() && grad_log_prob->defined()) {
    TORCH_CHECK_VALUE(grad_log_prob->device() == weights.device(), op, ": grad_log_prob must be on ",
                      weights.device(), ", got a tensor on ", grad_log_prob->device());
    TORCH_CHECK_TYPE(grad_log_prob->scalar_type() == weights.scalar_type(), op,
                     ": grad_log_prob must have the weights' dtype ", weights.scalar_type(), ", got ",
                     grad_log_prob->scalar_type());
    TORCH_CHECK_VALUE(grad_log_prob->sizes() == at::IntArrayRef({batch, queries}), op, ": grad_log_prob must be (N=",
                      batch, ", T=", queries, "), got shape ", grad_log_prob->sizes());
  }
}

}  // namespace fastattn
