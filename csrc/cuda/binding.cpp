// binding.cpp: the CUDA kernels of csrc/cuda/*.cu as torch ops (TORCH_LIBRARY_IMPL for
// the schemas of csrc/ops.cpp).  Compiled only when torch has CUDA (setup.py).
//
// For each op: check the arguments (device, dtype, shapes: a ValueError / TypeError
// naming the argument), make the layouts the kernels expect, allocate outputs and
// scratch with ATen, and launch on the current CUDA stream (no stream, event or handle
// of our own).  The GEMMs of the recurrent ops (input projection of all steps at once, the
// weight gradients) are ATen matmuls on float16 / bfloat16 operands as they are (float32
// out: mm_in_compute; the gate gradients rounded to the input dtype first, as torch's own
// 16-bit backward does), float32 or float64 ones otherwise.  A layer's recurrent loop runs
// in the persistent kernels of persistent_recurrent.cu (W_hh on chip; float32 FMAs for
// float32, tensor cores with W_hh and the GEMM operands in float16 / bfloat16 for those,
// float32 elsewhere) when the shape fits the device and FASTATTN_CUDA_PERSISTENT_RNN is not
// "0"; otherwise per step, h W_hh^T in ATen (h rounded to W_hh's float16 / bfloat16 as the
// tensor-core kernels round it) and the pointwise step in recurrent_pointwise.cu.  Attention
// computes float16 / bfloat16 natively (float accumulation); the recurrent ops compute them
// in float32 and return the input dtype.
// Multi-query (T >= kTensorCoreMinQueries) float16 / bfloat16 attention with head dims
// 64 / 128 runs forward on the tensor cores (attention_tensor_core.cu) unless the
// weights are wanted, and backward too unless their gradient or the Gaussian factor is.
// attention_decoder_step_inference runs the one-launch kernel of decoder_step.cu where it
// covers the step (FASTATTN_CUDA_FUSED_DECODER_STEP=0 turns it off) and the composed
// step of csrc/decoder_step.cpp otherwise.  hard_attention_outputs and its backward check
// their positions' range on the device (an assertion, as torch's own index ops make).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "../center_dtype.h"
#include "../common/layer_shape.h"
#include "../decoder_step.h"
#include "../hard_attention_outputs_checks.h"
#include "launch.h"

namespace fastattn {
namespace cuda {
namespace {

using OptionalTensor = std::optional<at::Tensor>;

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(const char* op, cudaError_t status) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(status),
              " (a feature dimension too large for the kernels' shared memory gives 'invalid argument')");
}

bool present(const OptionalTensor& tensor) { return tensor.has_value() && tensor->defined(); }

DType dtype_of(const char* op, const char* name, const at::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32, float64, float16 or bfloat16, got ",
                       tensor.scalar_type());
  }
}

at::ScalarType accumulation_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

void check_on(const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& like) {
  TORCH_CHECK_VALUE(tensor.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ",
                    tensor.device());
}

void check_like(const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& like) {
  check_on(op, name, tensor, like);
  TORCH_CHECK_TYPE(tensor.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ",
                   like.scalar_type(), ", got ", tensor.scalar_type());
}

void check_shape(const char* op, const char* name, const at::Tensor& tensor, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(tensor.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ",
                    tensor.sizes());
}

// (N, S, D) with contiguous rows, a batch stride of 0 kept (keys shared by the batch).
at::Tensor with_contiguous_rows(const at::Tensor& t) {
  const bool rows_contiguous = (t.size(2) <= 1 || t.stride(2) == 1) && (t.size(1) <= 1 || t.stride(1) == t.size(2));
  if (rows_contiguous) return t;
  if (t.size(0) > 1 && t.stride(0) == 0) return t.select(0, 0).contiguous().unsqueeze(0).expand(t.sizes());
  return t.contiguous();
}

int compute_capability_major(const at::Tensor& on) {
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, on.device().index()) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return major;
}

int multiprocessor_count(const at::Tensor& on) {
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, on.device().index()) != cudaSuccess) {
    (void)cudaGetLastError();
    return 1;
  }
  return count;
}

// ---------------------------------------------------------------- attention

// The checked attention inputs; the tensors keep the problem's pointers alive.
struct PreparedAttention {
  AttentionProblem problem;
  at::Tensor query, keys, values, v, bias, lengths, key_padding_mask, center;
};

PreparedAttention prepare_attention(const char* op, const at::Tensor& query, const at::Tensor& keys,
                                    const at::Tensor& values, const OptionalTensor& v, const OptionalTensor& bias,
                                    std::string_view score, double scale, const OptionalTensor& lengths,
                                    const OptionalTensor& key_padding_mask, bool causal,
                                    std::optional<int64_t> window, const OptionalTensor& center, bool gaussian) {
  PreparedAttention in;
  AttentionProblem& p = in.problem;
  if (score == "dot") {
    p.score = ScoreKind::kDot;
  } else if (score == "cosine") {
    p.score = ScoreKind::kCosine;
  } else if (score == "additive") {
    p.score = ScoreKind::kAdditive;
  } else {
    TORCH_CHECK_VALUE(false, op, ": score must be \"dot\", \"cosine\" or \"additive\", got \"", std::string(score),
                      "\"");
  }
  TORCH_CHECK_VALUE(query.is_cuda(), op, ": query must be a CUDA tensor, got one on ", query.device());
  p.dtype = dtype_of(op, "query", query);
  check_like(op, "keys", keys, query);
  check_like(op, "values", values, query);
  TORCH_CHECK_VALUE(query.dim() == 3, op, ": query must be (N, T, D), got shape ", query.sizes());
  TORCH_CHECK_VALUE(keys.dim() == 3 && (keys.size(0) == query.size(0) || keys.size(0) == 1) &&
                        keys.size(2) == query.size(2),
                    op, ": keys must be (N=", query.size(0), ", S, D=", query.size(2), ") or (1, S, D=",
                    query.size(2), ") (shared by the batch), got shape ", keys.sizes());
  TORCH_CHECK_VALUE(values.dim() == 3 && values.size(0) == query.size(0) && values.size(1) == keys.size(1), op,
                    ": values must be (N=", query.size(0), ", S=", keys.size(1), ", Dv), got shape ",
                    values.sizes());
  p.batch = query.size(0);
  p.query_length = query.size(1);
  p.source_length = keys.size(1);
  p.score_dim = query.size(2);
  p.value_dim = values.size(2);
  p.scale = scale;
  p.causal = causal;

  in.query = query.contiguous();
  in.keys = with_contiguous_rows(keys.expand({p.batch, p.source_length, p.score_dim}));  // (1, S, D): stride 0
  in.values = with_contiguous_rows(values);
  p.query = in.query.const_data_ptr();
  p.keys = in.keys.const_data_ptr();
  p.keys_batch_stride = in.keys.stride(0);
  p.values = in.values.const_data_ptr();
  p.values_batch_stride = in.values.stride(0);

  if (p.score == ScoreKind::kAdditive) {
    TORCH_CHECK_VALUE(scale == 1.0, op, ": scale must be 1 with score \"additive\" (v . tanh(q + k + bias) has none), got ",
                      scale);
    TORCH_CHECK_VALUE(present(v), op, ": score \"additive\" needs v of shape (Da=", p.score_dim, ",)");
    check_like(op, "v", *v, query);
    check_shape(op, "v", *v, {p.score_dim});
    in.v = v->contiguous();
    p.v = in.v.const_data_ptr();
    if (present(bias)) {
      check_like(op, "bias", *bias, query);
      check_shape(op, "bias", *bias, {p.score_dim});
      in.bias = bias->contiguous();
      p.bias = in.bias.const_data_ptr();
    }
  } else {
    TORCH_CHECK_VALUE(!present(v) && !present(bias), op,
                      ": v and bias are parameters of the additive score only, got them with score \"",
                      std::string(score), "\"");
  }
  if (present(lengths)) {
    TORCH_CHECK_TYPE(at::isIntegralType(lengths->scalar_type(), /*includeBool=*/false), op,
                     ": lengths must be an integer tensor, got ", lengths->scalar_type());
    check_shape(op, "lengths", *lengths, {p.batch});
    in.lengths = lengths->to(query.device(), at::kLong).contiguous();
    p.lengths = in.lengths.const_data_ptr<int64_t>();
  }
  if (present(key_padding_mask)) {
    TORCH_CHECK_TYPE(key_padding_mask->scalar_type() == at::kBool, op, ": key_padding_mask must be bool, got ",
                     key_padding_mask->scalar_type());
    check_shape(op, "key_padding_mask", *key_padding_mask, {p.batch, p.source_length});
    in.key_padding_mask = key_padding_mask->to(query.device()).contiguous();
    p.key_padding_mask = in.key_padding_mask.const_data_ptr<bool>();
  }
  if (window.has_value()) {
    TORCH_CHECK_VALUE(*window >= 0, op, ": window must be >= 0, got ", *window);
    p.window = *window;
  }
  if (present(center)) {
    check_on(op, "center", *center, query);
    TORCH_CHECK_TYPE(is_center_dtype(center->scalar_type(), query.scalar_type()), op,
                     ": center must have dtype ", query.scalar_type(), ", or float32 for a float16 or bfloat16 query, got ",
                     center->scalar_type());
    TORCH_CHECK_VALUE(window.has_value(), op, ": center (local-p attention) needs window");
    check_shape(op, "center", *center, {p.batch, p.query_length});
    in.center = center->to(accumulation_dtype(query.scalar_type())).contiguous();
    p.center = in.center.const_data_ptr();
  }
  p.gaussian = gaussian;
  TORCH_CHECK_VALUE(!gaussian || p.window >= 1, op, ": gaussian needs window >= 1 (sigma = window / 2), got ",
                    window.has_value() ? std::to_string(*window) : std::string("None"));
  return in;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_cuda(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values, const OptionalTensor& v,
    const OptionalTensor& bias, std::string_view score, double scale, const OptionalTensor& lengths,
    const OptionalTensor& key_padding_mask, bool causal, std::optional<int64_t> window, const OptionalTensor& center,
    bool gaussian, bool return_weights) {
  const char* op = "attention_forward";
  const PreparedAttention in = prepare_attention(op, query, keys, values, v, bias, score, scale, lengths,
                                                 key_padding_mask, causal, window, center, gaussian);
  const AttentionProblem& p = in.problem;
  const c10::cuda::CUDAGuard device_guard(query.device());
  const auto options = query.options();
  const auto accumulate = options.dtype(accumulation_dtype(query.scalar_type()));
  at::Tensor context = at::empty({p.batch, p.query_length, p.value_dim}, options);
  at::Tensor logsumexp = at::empty({p.batch, p.query_length}, accumulate);
  at::Tensor weights = at::empty({0}, options);
  at::Tensor scores, partial_context, partial_max, partial_sum;
  AttentionForwardBuffers out;
  out.context = context.mutable_data_ptr();
  out.logsumexp = logsumexp.mutable_data_ptr();
  if (return_weights) {
    weights = at::empty({p.batch, p.query_length, p.source_length}, options);
    scores = at::full({p.batch, p.query_length, p.source_length}, -INFINITY, accumulate);
    out.weights = weights.mutable_data_ptr();
    out.scores = scores.mutable_data_ptr();
  }
  // Multi-query float16 / bfloat16 problems without weights go to the tensor cores.
  if (!return_weights && p.query_length >= kTensorCoreMinQueries &&
      attention_tensor_core_supported(p, compute_capability_major(query))) {
    check_launch(op, launch_attention_forward_tensor_core(p, out, current_stream()));
    return {context, weights, logsumexp};
  }
  out.splits = attention_forward_splits(p, multiprocessor_count(query));
  if (out.splits > 1) {
    const int64_t rows = p.batch * p.query_length;
    partial_context = at::empty({rows, out.splits, p.value_dim}, accumulate);
    partial_max = at::empty({rows, out.splits}, accumulate);
    partial_sum = at::empty({rows, out.splits}, accumulate);
    out.partial_context = partial_context.mutable_data_ptr();
    out.partial_max = partial_max.mutable_data_ptr();
    out.partial_sum = partial_sum.mutable_data_ptr();
  }
  check_launch(op, launch_attention_forward(p, out, current_stream()));
  return {context, weights, logsumexp};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_context, const OptionalTensor& grad_weights, const at::Tensor& query,
    const at::Tensor& keys, const at::Tensor& values, const OptionalTensor& v, const OptionalTensor& bias,
    std::string_view score, double scale, const OptionalTensor& lengths, const OptionalTensor& key_padding_mask,
    bool causal, std::optional<int64_t> window, const OptionalTensor& center, bool gaussian,
    const at::Tensor& logsumexp, bool values_are_keys) {
  const char* op = "attention_backward";
  const PreparedAttention in = prepare_attention(op, query, keys, values, v, bias, score, scale, lengths,
                                                 key_padding_mask, causal, window, center, gaussian);
  TORCH_CHECK(!values_are_keys || keys.sizes() == values.sizes(), op,
              ": values_are_keys needs keys and values of one shape, got keys ", keys.sizes(), " and values ",
              values.sizes());
  const AttentionProblem& p = in.problem;
  const auto options = query.options();
  const auto accumulate = options.dtype(accumulation_dtype(query.scalar_type()));
  check_like(op, "grad_context", grad_context, query);
  check_shape(op, "grad_context", grad_context, {p.batch, p.query_length, p.value_dim});
  check_on(op, "logsumexp", logsumexp, query);
  TORCH_CHECK_TYPE(logsumexp.scalar_type() == accumulation_dtype(query.scalar_type()), op, ": logsumexp must be ",
                   accumulation_dtype(query.scalar_type()),
                   " (the accumulation dtype), got ", logsumexp.scalar_type());
  check_shape(op, "logsumexp", logsumexp, {p.batch, p.query_length});
  const c10::cuda::CUDAGuard device_guard(query.device());
  const at::Tensor grad_context_ = grad_context.contiguous();
  const at::Tensor logsumexp_ = logsumexp.contiguous();
  at::Tensor grad_weights_;
  if (present(grad_weights)) {
    check_like(op, "grad_weights", *grad_weights, query);
    check_shape(op, "grad_weights", *grad_weights, {p.batch, p.query_length, p.source_length});
    grad_weights_ = grad_weights->contiguous();
  }
  const bool additive = p.score == ScoreKind::kAdditive;
  const bool wants_center = gaussian && in.center.defined();
  at::Tensor grad_query = at::empty({p.batch, p.query_length, p.score_dim}, options);
  at::Tensor grad_keys = at::empty({p.batch, p.source_length, p.score_dim}, options);
  // Values that are the keys: the kernels add the value terms to grad_keys (no grad_values).
  at::Tensor grad_values = at::empty({values_are_keys ? 0 : p.batch, p.source_length, p.value_dim}, options);
  at::Tensor grad_center = wants_center ? at::empty({p.batch, p.query_length}, accumulate) : at::Tensor();
  at::Tensor grad_v_rows;  // additive: allocated below, for the kernels that fill it
  AttentionBackwardBuffers buffers;
  buffers.grad_context = grad_context_.const_data_ptr();
  buffers.grad_weights = grad_weights_.defined() ? grad_weights_.const_data_ptr() : nullptr;
  buffers.logsumexp = logsumexp_.const_data_ptr();
  buffers.grad_query = grad_query.mutable_data_ptr();
  buffers.grad_keys = grad_keys.mutable_data_ptr();
  buffers.grad_values = grad_values.mutable_data_ptr();
  buffers.values_are_keys = values_are_keys;
  buffers.grad_center = wants_center ? grad_center.mutable_data_ptr() : nullptr;
  // The tensor-core forward's problems go to its backward unless grad_weights is wanted,
  // the Gaussian factor is on (that backward's row term loses a peaked row's cancellation
  // there: attention_tensor_core.cu), or torch.use_deterministic_algorithms(True) is on:
  // that backward adds grad_query (and grad_v) with float atomics, whose order varies; the
  // per-row kernels have none.
  const bool grad_context_aligned = reinterpret_cast<uintptr_t>(grad_context_.const_data_ptr()) % 16 == 0;
  if (!grad_weights_.defined() && !p.gaussian && grad_context_aligned && p.query_length >= kTensorCoreMinQueries &&
      !at::globalContext().deterministicAlgorithms() &&
      attention_tensor_core_supported(p, compute_capability_major(query))) {
    if (additive) {  // grad_v itself
      grad_v_rows = at::empty({1, 1, p.score_dim}, accumulate);
      buffers.grad_v_rows = grad_v_rows.mutable_data_ptr();
    }
    at::Tensor row_dot = at::empty({p.batch, p.query_length}, accumulate);
    buffers.row_dot = row_dot.mutable_data_ptr();
    at::Tensor grad_query_accumulator = at::empty({p.batch, p.query_length, p.score_dim}, accumulate);
    check_launch(op, launch_attention_backward_tensor_core(p, buffers, grad_query_accumulator.mutable_data_ptr<float>(),
                                                           current_stream()));
  } else {
    if (additive) {  // each row's share of grad_v
      grad_v_rows = at::empty({p.batch, p.query_length, p.score_dim}, accumulate);
      buffers.grad_v_rows = grad_v_rows.mutable_data_ptr();
    }
    // A row's keys are split over blocks as in the forward (decode steps).
    const int64_t rows = p.batch * p.query_length;
    at::Tensor row_terms = at::empty({rows, kRowTermsElements}, accumulate);
    buffers.row_terms = row_terms.mutable_data_ptr();
    buffers.splits = attention_forward_splits(p, multiprocessor_count(query));
    at::Tensor partial_row_terms, partial_grad_query, partial_grad_v;
    if (buffers.splits > 1) {
      partial_row_terms = at::empty({rows, buffers.splits, kOnlineRowTermsElements}, accumulate);
      buffers.partial_row_terms = partial_row_terms.mutable_data_ptr();
      partial_grad_query = at::empty({p.batch * p.query_length, buffers.splits, p.score_dim}, accumulate);
      buffers.partial_grad_query = partial_grad_query.mutable_data_ptr();
      if (additive) {
        partial_grad_v = at::empty_like(partial_grad_query);
        buffers.partial_grad_v = partial_grad_v.mutable_data_ptr();
      }
    }
    check_launch(op, launch_attention_backward(p, buffers, current_stream()));
  }

  const auto empty = [&] { return at::empty({0}, options); };  // absent gradients must not alias
  const std::vector<int64_t> batch_and_rows = {0, 1};  // a braced list is ambiguous for Tensor::sum
  at::Tensor grad_v = additive ? grad_v_rows.sum(batch_and_rows).to(query.scalar_type()) : empty();
  at::Tensor grad_bias = additive && in.bias.defined()
                             ? grad_query.sum(batch_and_rows, false, accumulation_dtype(query.scalar_type()))
                                   .to(query.scalar_type())
                             : empty();
  if (keys.size(0) != p.batch) {  // keys shared by the batch: their gradient summed over it
    grad_keys = grad_keys.sum(0, true, accumulation_dtype(query.scalar_type())).to(query.scalar_type());
  }
  return {grad_query, grad_keys, values_are_keys ? empty() : grad_values, grad_v, grad_bias,
          wants_center ? grad_center.to(center->scalar_type()) : empty()};
}

at::Tensor sample_positions_cuda(const at::Tensor& weights, bool sample, std::optional<at::Generator> generator) {
  const char* op = "sample_positions";
  TORCH_CHECK_VALUE(weights.is_cuda(), op, ": weights must be a CUDA tensor, got one on ", weights.device());
  const DType dtype = dtype_of(op, "weights", weights);
  TORCH_CHECK_VALUE(weights.dim() == 3, op, ": weights must be (N, T, S), got shape ", weights.sizes());
  const c10::cuda::CUDAGuard device_guard(weights.device());
  const at::Tensor rows_of_weights = weights.contiguous();
  const int64_t rows = weights.size(0) * weights.size(1), source_length = weights.size(2);
  at::Tensor index = at::empty({weights.size(0), weights.size(1)}, weights.options().dtype(at::kLong));
  at::Tensor uniforms;
  if (sample && rows > 0) uniforms = at::rand({rows}, generator, weights.options().dtype(at::kDouble));
  check_launch(op, launch_sample_positions(dtype, rows_of_weights.const_data_ptr(), rows, source_length,
                                           uniforms.defined() ? uniforms.const_data_ptr<double>() : nullptr,
                                           index.mutable_data_ptr<int64_t>(), current_stream()));
  return index;
}

// ---------------------------------------------------------------- hard attention's outputs

// The positions' range is checked on the device: `outside` (set by the kernels where a position
// is outside [0, S)) asserted there, as torch's own index ops assert theirs (the message goes to
// the device's assertion, not to Python); reading it here would wait for the kernels.
void assert_inside(const at::Tensor& outside) {
  at::_assert_async(outside.eq(0), "fastattn: hard attention's index must hold positions in [0, S)");
}

void refuse_empty_rows(const char* op, const at::Tensor& weights) {
  TORCH_CHECK_VALUE(weights.size(2) > 0 || weights.size(0) * weights.size(1) == 0, op,
                    ": index must hold positions in [0, S=0)");
}

std::tuple<at::Tensor, at::Tensor> hard_attention_outputs_cuda(const at::Tensor& weights_in, const at::Tensor& index_in,
                                                               const at::Tensor& values_in) {
  static constexpr char op[] = "hard_attention_outputs";
  check_hard_attention_outputs(op, weights_in, index_in, values_in, c10::DeviceType::CUDA);
  refuse_empty_rows(op, weights_in);
  const c10::cuda::CUDAGuard device_guard(weights_in.device());
  const at::Tensor weights = weights_in.contiguous(), index = index_in.contiguous(), values = values_in.contiguous();
  HardAttentionOutputsProblem p;
  p.weights_dtype = dtype_of(op, "weights", weights);
  p.values_dtype = dtype_of(op, "values", values);
  p.batch = weights.size(0), p.queries = weights.size(1), p.source_length = weights.size(2);
  p.value_dim = values.size(2);
  at::Tensor context = at::empty({p.batch, p.queries, p.value_dim}, values.options());
  at::Tensor log_prob = at::empty({p.batch, p.queries}, weights.options());
  if (p.batch * p.queries == 0) return {context, log_prob};
  at::Tensor outside = at::zeros({}, weights.options().dtype(at::kInt));
  check_launch(op, launch_hard_attention_outputs(p, weights.const_data_ptr(), index.const_data_ptr<int64_t>(),
                                                 values.const_data_ptr(), context.mutable_data_ptr(),
                                                 log_prob.mutable_data_ptr(), outside.mutable_data_ptr<int>(),
                                                 current_stream()));
  assert_inside(outside);
  return {context, log_prob};
}

std::tuple<at::Tensor, at::Tensor> hard_attention_outputs_backward_cuda(const OptionalTensor& grad_context_in,
                                                                        const OptionalTensor& grad_log_prob_in,
                                                                        const at::Tensor& weights_in,
                                                                        const at::Tensor& index_in) {
  static constexpr char op[] = "hard_attention_outputs_backward";
  check_hard_attention_outputs_backward(op, grad_context_in, grad_log_prob_in, weights_in, index_in,
                                        c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(weights_in.device());
  const at::Tensor weights = weights_in.contiguous(), index = index_in.contiguous();
  const bool context_grad = present(grad_context_in), log_prob_grad = present(grad_log_prob_in);
  const at::Tensor grad_context = context_grad ? grad_context_in->contiguous() : at::Tensor();
  const at::Tensor grad_log_prob = log_prob_grad ? grad_log_prob_in->contiguous() : at::Tensor();
  const at::TensorOptions value_options = context_grad ? grad_context.options() : weights.options();
  HardAttentionOutputsProblem p;
  p.weights_dtype = dtype_of(op, "weights", weights);
  p.values_dtype = context_grad ? dtype_of(op, "grad_context", grad_context) : p.weights_dtype;
  p.batch = weights.size(0), p.queries = weights.size(1), p.source_length = weights.size(2);
  p.value_dim = context_grad ? grad_context.size(2) : 0;
  at::Tensor grad_weights = log_prob_grad ? at::empty_like(weights) : at::empty({0}, weights.options());
  // The values' gradient summed in float (double for float64), converted at the end.
  const at::ScalarType sum_dtype = accumulation_dtype(value_options.dtype().toScalarType());
  at::Tensor sums = context_grad ? at::zeros({p.batch, p.source_length, p.value_dim}, value_options.dtype(sum_dtype))
                                 : at::empty({0}, value_options);
  if (p.batch * p.queries > 0 && (context_grad || log_prob_grad)) {
    refuse_empty_rows(op, weights);
    at::Tensor factor = at::empty({context_grad ? p.batch * p.queries : 0}, weights.options().dtype(at::kFloat));
    at::Tensor outside = at::zeros({}, weights.options().dtype(at::kInt));
    check_launch(op, launch_hard_attention_outputs_backward(
                         p, context_grad ? grad_context.const_data_ptr() : nullptr,
                         log_prob_grad ? grad_log_prob.const_data_ptr() : nullptr, weights.const_data_ptr(),
                         index.const_data_ptr<int64_t>(), log_prob_grad ? grad_weights.mutable_data_ptr() : nullptr,
                         context_grad ? sums.mutable_data_ptr() : nullptr,
                         context_grad ? factor.mutable_data_ptr<float>() : nullptr, outside.mutable_data_ptr<int>(),
                         current_stream()));
    assert_inside(outside);
  }
  return {grad_weights, sums.scalar_type() == value_options.dtype().toScalarType() ? sums : sums.to(value_options.dtype())};
}

at::Tensor fast_tanh_cuda(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), "fast_tanh: x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "fast_tanh: x must be float32, got ", x.scalar_type());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor input = x.contiguous();
  at::Tensor output = at::empty_like(input);
  check_launch("fast_tanh", launch_fast_tanh(input.const_data_ptr<float>(), output.mutable_data_ptr<float>(),
                                             input.numel(), current_stream()));
  return output;
}

// ---------------------------------------------------------------- recurrent

constexpr int64_t kLstmGates = 4, kGruGates = 3;

// The dtype the recurrent kernels compute in: float64 stays, the others run in float32.
at::ScalarType recurrent_dtype(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor, got one on ", x.device());
  dtype_of(op, "x", x);
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

DType kernel_dtype(at::ScalarType compute) { return compute == at::kDouble ? DType::kFloat64 : DType::kFloat32; }

at::Tensor compute_in(const at::Tensor& t, at::ScalarType compute) {
  return t.defined() ? t.to(compute).contiguous() : t;
}
at::Tensor compute_in(const OptionalTensor& t, at::ScalarType compute) {
  return present(t) ? t->to(compute).contiguous() : at::Tensor();
}
at::Tensor contiguous_or_undefined(const OptionalTensor& t) { return present(t) ? t->contiguous() : at::Tensor(); }
// A new contiguous tensor holding t in the compute dtype, for a kernel to write into: one
// copy kernel whatever t's dtype (converting first, then cloning, took two for 16-bit t).
at::Tensor copy_in(const at::Tensor& t, at::ScalarType compute) {
  return at::empty(t.sizes(), t.options().dtype(compute)).copy_(t);
}

// out = a @ b in the compute dtype (out float32, or float64 for float64 operands).  float16 /
// bfloat16 operands go to cuBLAS as they are, with float32 accumulation and output
// (aten::mm.dtype, CUDA only): converting them first would copy the weights, the largest
// tensors of a cell, on every call.  mm_in_compute allocates out.
at::Tensor& mm_in_compute_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const at::ScalarType dtype = a.scalar_type();
  return dtype == at::kHalf || dtype == at::kBFloat16 ? at::mm_out(out, a, b, at::kFloat) : at::mm_out(out, a, b);
}
at::Tensor mm_in_compute(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options().dtype(accumulation_dtype(a.scalar_type())));
  return mm_in_compute_out(out, a, b);
}

// A per-step path's float32 state or gate gradients as the operand of a GEMM with
// `weights`: rounded to their float16 / bfloat16, as the persistent tensor-core kernels
// round theirs (the same tensor for float32 and float64).
at::Tensor in_dtype_of(const at::Tensor& state, const at::Tensor& weights) { return state.to(weights.scalar_type()); }

const void* pointer_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

void check_weights(const char* op, const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                   const OptionalTensor& b_ih, const OptionalTensor& b_hh, int64_t gate_rows, int64_t input_size,
                   int64_t hidden_in) {
  check_like(op, "w_ih", w_ih, x);
  check_like(op, "w_hh", w_hh, x);
  check_shape(op, "w_ih", w_ih, {gate_rows, input_size});
  check_shape(op, "w_hh", w_hh, {gate_rows, hidden_in});
  if (present(b_ih)) {
    check_like(op, "b_ih", *b_ih, x);
    check_shape(op, "b_ih", *b_ih, {gate_rows});
  }
  if (present(b_hh)) {
    check_like(op, "b_hh", *b_hh, x);
    check_shape(op, "b_hh", *b_hh, {gate_rows});
  }
}

at::Tensor bias_grad(const OptionalTensor& bias, const at::Tensor& grad_gates2d, at::ScalarType dtype) {
  return present(bias) ? grad_gates2d.sum(0).to(dtype) : at::empty({0}, grad_gates2d.options().dtype(dtype));
}

void check_all_like(const char* op, const at::Tensor& x,
                    std::initializer_list<std::pair<const at::Tensor*, const char*>> list) {
  for (const auto& [tensor, name] : list) check_like(op, name, *tensor, x);
}

// A step computed in `compute`; its forward's biases, states and outputs in `storage` (a
// cell's own dtype), or in the compute dtype (the layers' buffers) when not given.
RecurrentStep step_of(at::ScalarType compute, int64_t batch, int64_t hidden, const at::Tensor& lengths, int64_t t,
                      std::optional<DType> storage = std::nullopt) {
  RecurrentStep step;
  step.dtype = kernel_dtype(compute);
  step.storage = storage.value_or(step.dtype);
  step.batch = batch;
  step.hidden = hidden;
  step.lengths = lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr;
  step.time = t;
  return step;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward_cuda(const at::Tensor& x_in, const at::Tensor& h_in,
                                                                      const at::Tensor& c_in, const at::Tensor& w_ih_in,
                                                                      const at::Tensor& w_hh_in,
                                                                      const OptionalTensor& b_ih_in,
                                                                      const OptionalTensor& b_hh_in) {
  const char* op = "lstm_cell_forward";
  const at::ScalarType compute = recurrent_dtype(op, x_in);
  TORCH_CHECK_VALUE(x_in.dim() == 2 && h_in.dim() == 2 && c_in.dim() == 2, op,
                    ": x, h and c must be 2-D (B, features), got shapes ", x_in.sizes(), ", ", h_in.sizes(), ", ",
                    c_in.sizes());
  check_all_like(op, x_in, {{&h_in, "h"}, {&c_in, "c"}});
  const int64_t B = x_in.size(0), I = x_in.size(1), H = c_in.size(1), hidden_in = h_in.size(1);
  check_shape(op, "h", h_in, {B, hidden_in});
  check_shape(op, "c", c_in, {B, H});
  check_weights(op, x_in, w_ih_in, w_hh_in, b_ih_in, b_hh_in, kLstmGates * H, I, hidden_in);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  // Three kernels: the two GEMMs (float32 out) and the step, which reads the biases and c
  // and writes h', c' and the saved gates in x's dtype.
  const at::Tensor b_ih = contiguous_or_undefined(b_ih_in), b_hh = contiguous_or_undefined(b_hh_in);
  const at::Tensor c = c_in.contiguous();
  const at::Tensor hidden_gates = mm_in_compute(h_in, w_hh_in.t());
  const at::Tensor gates = mm_in_compute(x_in, w_ih_in.t());
  const bool converted = x_in.scalar_type() != compute;
  at::Tensor saved = converted ? at::empty({B, kLstmGates * H}, x_in.options()) : gates;
  at::Tensor c_next = at::empty({B, H}, x_in.options()), h_next = at::empty({B, H}, x_in.options());
  check_launch(op, launch_lstm_step_forward(step_of(compute, B, H, at::Tensor(), 0, dtype_of(op, "x", x_in)),
                                            gates.const_data_ptr(), kLstmGates * H, saved.mutable_data_ptr(),
                                            hidden_gates.const_data_ptr(), pointer_or_null(b_ih),
                                            pointer_or_null(b_hh), c.const_data_ptr(), c_next.mutable_data_ptr(),
                                            h_next.mutable_data_ptr(), nullptr, nullptr, current_stream()));
  return {h_next, c_next, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_backward_cuda(
    const at::Tensor& grad_h_next_in, const at::Tensor& grad_c_next_in, const at::Tensor& x_in,
    const at::Tensor& h_in, const at::Tensor& c_in, const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
    const OptionalTensor& b_ih_in, const OptionalTensor& b_hh_in, const at::Tensor& c_next_in,
    const at::Tensor& saved_in) {
  const char* op = "lstm_cell_backward";
  const at::ScalarType compute = recurrent_dtype(op, x_in);
  TORCH_CHECK_VALUE(x_in.dim() == 2 && h_in.dim() == 2 && c_in.dim() == 2, op,
                    ": x, h and c must be 2-D (B, features), got shapes ", x_in.sizes(), ", ", h_in.sizes(), ", ",
                    c_in.sizes());
  check_all_like(op, x_in, {{&h_in, "h"}, {&c_in, "c"}, {&grad_h_next_in, "grad_h_next"},
                            {&grad_c_next_in, "grad_c_next"}, {&c_next_in, "c_next"}, {&saved_in, "saved"}});
  const int64_t B = x_in.size(0), I = x_in.size(1), H = c_in.size(1), hidden_in = h_in.size(1);
  check_shape(op, "h", h_in, {B, hidden_in});
  check_shape(op, "c", c_in, {B, H});
  check_shape(op, "grad_h_next", grad_h_next_in, {B, H});
  check_shape(op, "grad_c_next", grad_c_next_in, {B, H});
  check_shape(op, "c_next", c_next_in, {B, H});
  check_shape(op, "saved", saved_in, {B, kLstmGates * H});
  check_weights(op, x_in, w_ih_in, w_hh_in, b_ih_in, b_hh_in, kLstmGates * H, I, hidden_in);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor c = compute_in(c_in, compute), grad_h_next = compute_in(grad_h_next_in, compute);
  const at::Tensor c_next = compute_in(c_next_in, compute), saved = compute_in(saved_in, compute);
  at::Tensor grad_c = copy_in(grad_c_next_in, compute);
  at::Tensor grad_gates = at::empty({B, kLstmGates * H}, c.options());
  check_launch(op, launch_lstm_step_backward(step_of(compute, B, H, at::Tensor(), 0), grad_h_next.const_data_ptr(),
                                             nullptr, grad_c.mutable_data_ptr(), saved.const_data_ptr(),
                                             kLstmGates * H, c.const_data_ptr(), H, c_next.const_data_ptr(), H,
                                             grad_gates.mutable_data_ptr(), current_stream()));
  const auto dtype = x_in.scalar_type();
  const at::Tensor grad_gates_operand = grad_gates.to(dtype);  // a GEMM's operands share a dtype
  return {mm_in_compute(grad_gates_operand, w_ih_in).to(dtype),
          mm_in_compute(grad_gates_operand, w_hh_in).to(dtype),
          grad_c.to(dtype),
          mm_in_compute(grad_gates_operand.t(), x_in).to(dtype),
          mm_in_compute(grad_gates_operand.t(), h_in).to(dtype),
          bias_grad(b_ih_in, grad_gates, dtype),
          bias_grad(b_hh_in, grad_gates, dtype)};
}

std::tuple<at::Tensor, at::Tensor> gru_cell_forward_cuda(const at::Tensor& x_in, const at::Tensor& h_in,
                                                         const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
                                                         const OptionalTensor& b_ih_in, const OptionalTensor& b_hh_in) {
  const char* op = "gru_cell_forward";
  const at::ScalarType compute = recurrent_dtype(op, x_in);
  TORCH_CHECK_VALUE(x_in.dim() == 2 && h_in.dim() == 2, op, ": x and h must be 2-D (B, features), got shapes ",
                    x_in.sizes(), ", ", h_in.sizes());
  check_like(op, "h", h_in, x_in);
  const int64_t B = x_in.size(0), I = x_in.size(1), H = h_in.size(1);
  check_shape(op, "h", h_in, {B, H});
  check_weights(op, x_in, w_ih_in, w_hh_in, b_ih_in, b_hh_in, kGruGates * H, I, H);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  // Three kernels, as the LSTM cell's: the GEMMs and the step, in x's dtype around it.
  const at::Tensor b_ih = contiguous_or_undefined(b_ih_in), b_hh = contiguous_or_undefined(b_hh_in);
  const at::Tensor h = h_in.contiguous();
  const at::Tensor hidden_gates = mm_in_compute(h_in, w_hh_in.t());
  at::Tensor gates = at::empty({B, 4 * H}, hidden_gates.options());  // W_ih x in the first 3H
  at::Tensor input_gates = gates.narrow(1, 0, kGruGates * H);
  mm_in_compute_out(input_gates, x_in, w_ih_in.t());
  const bool converted = x_in.scalar_type() != compute;
  at::Tensor saved = converted ? at::empty({B, 4 * H}, x_in.options()) : gates;
  at::Tensor h_next = at::empty({B, H}, x_in.options());
  check_launch(op, launch_gru_step_forward(step_of(compute, B, H, at::Tensor(), 0, dtype_of(op, "x", x_in)),
                                           gates.const_data_ptr(), saved.mutable_data_ptr(),
                                           hidden_gates.const_data_ptr(), pointer_or_null(b_ih),
                                           pointer_or_null(b_hh), h.const_data_ptr(), h_next.mutable_data_ptr(),
                                           nullptr, current_stream()));
  return {h_next, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_cell_backward_cuda(
    const at::Tensor& grad_h_next_in, const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& w_ih_in,
    const at::Tensor& w_hh_in, const OptionalTensor& b_ih_in, const OptionalTensor& b_hh_in,
    const at::Tensor& saved_in) {
  const char* op = "gru_cell_backward";
  const at::ScalarType compute = recurrent_dtype(op, x_in);
  TORCH_CHECK_VALUE(x_in.dim() == 2 && h_in.dim() == 2, op, ": x and h must be 2-D (B, features), got shapes ",
                    x_in.sizes(), ", ", h_in.sizes());
  check_all_like(op, x_in, {{&h_in, "h"}, {&grad_h_next_in, "grad_h_next"}, {&saved_in, "saved"}});
  const int64_t B = x_in.size(0), I = x_in.size(1), H = h_in.size(1);
  check_shape(op, "h", h_in, {B, H});
  check_shape(op, "grad_h_next", grad_h_next_in, {B, H});
  check_shape(op, "saved", saved_in, {B, 4 * H});
  check_weights(op, x_in, w_ih_in, w_hh_in, b_ih_in, b_hh_in, kGruGates * H, I, H);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor h = compute_in(h_in, compute);
  const at::Tensor grad_h_next = compute_in(grad_h_next_in, compute), saved = compute_in(saved_in, compute);
  at::Tensor grad_input_gates = at::empty({B, kGruGates * H}, h.options());
  at::Tensor grad_hidden_gates = at::empty({B, kGruGates * H}, h.options());
  at::Tensor direct = at::empty({B, H}, h.options());
  check_launch(op, launch_gru_step_backward(step_of(compute, B, H, at::Tensor(), 0), grad_h_next.const_data_ptr(),
                                            nullptr, saved.const_data_ptr(), h.const_data_ptr(),
                                            grad_input_gates.mutable_data_ptr(),
                                            grad_hidden_gates.mutable_data_ptr(), direct.mutable_data_ptr(),
                                            current_stream()));
  const auto dtype = x_in.scalar_type();
  // A GEMM's operands share a dtype.  direct is added after the GEMM: addmm.dtype would
  // want it in the operands' dtype too.
  const at::Tensor grad_input_operand = grad_input_gates.to(dtype), grad_hidden_operand = grad_hidden_gates.to(dtype);
  return {mm_in_compute(grad_input_operand, w_ih_in).to(dtype),
          mm_in_compute(grad_hidden_operand, w_hh_in).add_(direct).to(dtype),
          mm_in_compute(grad_input_operand.t(), x_in).to(dtype),
          mm_in_compute(grad_hidden_operand.t(), h_in).to(dtype),
          bias_grad(b_ih_in, grad_input_gates, dtype),
          bias_grad(b_hh_in, grad_hidden_gates, dtype)};
}

// ---------------------------------------------------------------- layers

LayerShape check_layer(const char* op, const at::Tensor& x, const at::Tensor& h0, const at::Tensor* c0,
                       const at::Tensor& w_ih, const at::Tensor& w_hh, const OptionalTensor& b_ih,
                       const OptionalTensor& b_hh, int64_t gates) {
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must be (T, B, I), got shape ", x.sizes());
  TORCH_CHECK_VALUE(w_hh.dim() == 2 && w_hh.size(0) % gates == 0, op, ": w_hh must be (", gates,
                    " * H, H), got shape ", w_hh.sizes());
  const int64_t H = w_hh.size(0) / gates;
  const LayerShape shape{x.size(0), x.size(1), x.size(2), H};
  check_like(op, "h0", h0, x);
  check_shape(op, "h0", h0, {shape.B, H});
  if (c0 != nullptr) {
    check_like(op, "c0", *c0, x);
    check_shape(op, "c0", *c0, {shape.B, H});
  }
  check_weights(op, x, w_ih, w_hh, b_ih, b_hh, gates * H, shape.I, H);
  return shape;
}

at::Tensor layer_lengths(const char* op, const OptionalTensor& lengths, const at::Tensor& x, int64_t batch) {
  if (!present(lengths)) return at::Tensor();
  TORCH_CHECK_TYPE(at::isIntegralType(lengths->scalar_type(), /*includeBool=*/false), op,
                   ": lengths must be an integer tensor, got ", lengths->scalar_type());
  check_shape(op, "lengths", *lengths, {batch});
  return lengths->to(x.device(), at::kLong).contiguous();
}

int64_t time_of_step(int64_t s, int64_t steps, bool reverse) { return reverse ? steps - 1 - s : s; }

at::Tensor barrier_counter(const at::Tensor& like) { return at::zeros({1}, like.options().dtype(at::kLong)); }

// A layer's recurrent loop in the persistent kernels: the plan, the launch.h layer and
// what its pointers point into (W_hh in the input dtype, the barrier counter) and, for
// float16 / bfloat16 (the tensor cores' GEMM), the (2, B, width) operand ping-pong
// buffer in that dtype (width H forward, gates * H backward; undefined for float32).
struct PersistentRun {
  PersistentPlan plan;
  PersistentLayer layer;
  at::Tensor w_hh, barrier, operand;
  void* operand_or_null() const { return operand.defined() ? operand.mutable_data_ptr() : nullptr; }
};

// The persistent run of a layer, or nullopt for the per-step path: float32 (FMAs) and
// float16 / bfloat16 (tensor cores) only, FASTATTN_CUDA_PERSISTENT_RNN=0 turns it off,
// and W_hh's slices must fit the device's shared memory with one co-resident block per
// SM.  The caller holds the device guard.
std::optional<PersistentRun> persistent_run(const char* op, RecurrentCell cell, bool backward, const LayerShape& shape,
                                            const at::Tensor& x_in, const at::Tensor& w_hh_in,
                                            const at::Tensor& lengths, bool reverse) {
  const DType operand = dtype_of(op, "x", x_in);
  if (operand == DType::kFloat64 || shape.T == 0 || shape.B == 0 || shape.H == 0) return std::nullopt;
  const char* setting = std::getenv("FASTATTN_CUDA_PERSISTENT_RNN");
  if (setting != nullptr && std::string_view(setting) == "0") return std::nullopt;
  PersistentRun run;
  check_launch(op, persistent_recurrent_plan_on_device(cell, backward, operand, shape.B, shape.H, &run.plan));
  if (run.plan.blocks == 0) return std::nullopt;
  run.w_hh = w_hh_in.contiguous();
  run.barrier = barrier_counter(x_in);
  if (operand != DType::kFloat32) {
    const int64_t gates = cell == RecurrentCell::kLstm ? kLstmGates : kGruGates;
    run.operand = at::empty({2, shape.B, backward ? gates * shape.H : shape.H}, x_in.options());
  }
  run.layer.steps = shape.T;
  run.layer.batch = shape.B;
  run.layer.hidden = shape.H;
  run.layer.lengths = lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr;
  run.layer.reverse = reverse;
  run.layer.operand = operand;
  run.layer.w_hh = run.w_hh.const_data_ptr();
  run.layer.barrier = reinterpret_cast<unsigned long long*>(run.barrier.mutable_data_ptr<int64_t>());
  return run;
}

const float* float_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

// The hidden state each step started from (T, B, H), for grad_w_hh and the GRU: h0 at
// a sequence's first active step, the neighbouring step's output otherwise (rows of
// inactive steps have zero gate gradients, whatever they hold).
at::Tensor previous_hidden(const at::Tensor& output, const at::Tensor& h0, const at::Tensor& lengths, bool reverse) {
  const int64_t T = output.size(0);
  if (T == 0) return output;
  if (!reverse) return at::cat({h0.unsqueeze(0), output.narrow(0, 0, T - 1)});
  const at::Tensor shifted = at::cat({output.narrow(0, 1, T - 1), h0.unsqueeze(0)});
  if (!lengths.defined()) return shifted;
  // reverse with lengths: the first step of sequence b is t = lengths[b] - 1, from h0.
  const at::Tensor next_step = at::arange(1, T + 1, lengths.options()).unsqueeze(1);
  const at::Tensor next_active = next_step < lengths.clamp(0, T).unsqueeze(0);
  return at::where(next_active.unsqueeze(2), shifted, h0.unsqueeze(0));
}

// What the LSTM and GRU layer forwards share before their recurrences: the biases in the
// compute dtype, output and saved allocated, and the input projections of all steps (one
// GEMM on x and W_ih as they are: float16 / bfloat16 operands with float32 output, so
// neither is copied to float32 first) in the first G columns of saved.  The caller holds
// the device guard.
struct LayerForwardStart {
  at::Tensor lengths, b_ih, b_hh, output, saved;
};

LayerForwardStart start_layer_forward(const char* op, at::ScalarType compute, const LayerShape& shape, int64_t G,
                                      int64_t width, const at::Tensor& x_in, const at::Tensor& w_ih_in,
                                      const OptionalTensor& b_ih_in, const OptionalTensor& b_hh_in,
                                      const OptionalTensor& lengths_in) {
  const int64_t T = shape.T, B = shape.B, I = shape.I, H = shape.H;
  LayerForwardStart start;
  start.lengths = layer_lengths(op, lengths_in, x_in, B);
  start.b_ih = compute_in(b_ih_in, compute);
  start.b_hh = compute_in(b_hh_in, compute);
  start.output = at::empty({T, B, H}, x_in.options().dtype(compute));
  start.saved = at::empty({T, B, width}, start.output.options());
  at::Tensor input_gates = start.saved.view({T * B, width}).narrow(1, 0, G);
  mm_in_compute_out(input_gates, x_in.reshape({T * B, I}), w_ih_in.t());
  return start;
}

// The buffers of a persistent forward (float32 compute); c_state undefined for the GRU.
// The tensor cores' operand buffer gets h0 in its first half.
PersistentForwardBuffers persistent_forward_buffers(LayerForwardStart& start, at::Tensor& h_state,
                                                    at::Tensor& c_state, at::Tensor& h_scratch,
                                                    const PersistentRun& run) {
  if (run.operand.defined()) run.operand.select(0, 0).copy_(h_state);
  PersistentForwardBuffers buffers;
  buffers.h_operand = run.operand_or_null();
  buffers.b_ih = float_or_null(start.b_ih);
  buffers.b_hh = float_or_null(start.b_hh);
  buffers.saved = start.saved.mutable_data_ptr<float>();
  buffers.output = start.output.mutable_data_ptr<float>();
  buffers.h_state = h_state.mutable_data_ptr<float>();
  buffers.c_state = c_state.defined() ? c_state.mutable_data_ptr<float>() : nullptr;
  buffers.h_scratch = h_scratch.mutable_data_ptr<float>();
  return buffers;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward_cuda(
    const at::Tensor& x_in, const at::Tensor& h0_in, const at::Tensor& c0_in, const at::Tensor& w_ih_in,
    const at::Tensor& w_hh_in, const OptionalTensor& b_ih_in, const OptionalTensor& b_hh_in,
    const OptionalTensor& lengths_in, bool reverse) {
  const char* op = "lstm_layer_forward";
  const at::ScalarType compute = recurrent_dtype(op, x_in);
  const LayerShape shape = check_layer(op, x_in, h0_in, &c0_in, w_ih_in, w_hh_in, b_ih_in, b_hh_in, kLstmGates);
  const int64_t T = shape.T, B = shape.B, H = shape.H, G = kLstmGates * H, width = G + H;
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  LayerForwardStart start =
      start_layer_forward(op, compute, shape, G, width, x_in, w_ih_in, b_ih_in, b_hh_in, lengths_in);
  const at::Tensor &lengths = start.lengths, &b_ih = start.b_ih, &b_hh = start.b_hh;
  at::Tensor &output = start.output, &saved = start.saved;
  at::Tensor h_state = copy_in(h0_in, compute), c_state = copy_in(c0_in, compute);
  const cudaStream_t stream = current_stream();
  if (const auto run = persistent_run(op, RecurrentCell::kLstm, false, shape, x_in, w_hh_in, lengths, reverse)) {
    at::Tensor h_scratch = at::empty({B, H}, output.options());
    check_launch(op, launch_persistent_lstm_forward(run->layer, run->plan,
                                                    persistent_forward_buffers(start, h_state, c_state, h_scratch, *run),
                                                    stream));
  } else {
    const at::Tensor w_hh_t = w_hh_in.t();
    at::Tensor hidden_gates = at::empty({B, G}, output.options());
    for (int64_t s = 0; s < shape.steps_to_run(); ++s) {
      const int64_t t = time_of_step(s, T, reverse);
      mm_in_compute_out(hidden_gates, in_dtype_of(h_state, w_hh_t), w_hh_t);
      at::Tensor saved_t = saved.select(0, t);
      check_launch(op, launch_lstm_step_forward(step_of(compute, B, H, lengths, t), saved_t.const_data_ptr(), width,
                                                saved_t.mutable_data_ptr(), hidden_gates.const_data_ptr(),
                                                pointer_or_null(b_ih), pointer_or_null(b_hh), c_state.const_data_ptr(),
                                                c_state.mutable_data_ptr(), h_state.mutable_data_ptr(),
                                                saved_t.narrow(1, G, H).mutable_data_ptr(),
                                                output.select(0, t).mutable_data_ptr(), stream));
    }
  }
  const auto dtype = x_in.scalar_type();
  return {output.to(dtype), h_state.to(dtype), c_state.to(dtype), saved.to(dtype)};
}

// A layer's BPTT on the per-step path: for s = T - 1 .. 0, the gradient reaching h_t from
// the step after t (hidden_gates of that step @ w_hh, plus `direct` where defined: the
// GRU's dh' * z), then step_backward(s, t), which writes hidden_gates[t]; last, the
// gradient reaching h0.  w_hh in the input dtype (in_dtype_of: the GEMM's operands).
template <typename StepBackward>
void per_step_backward(const char* op, at::ScalarType compute, const LayerShape& shape, const at::Tensor& lengths,
                       bool reverse, const at::Tensor& w_hh, const at::Tensor& hidden_gates,
                       const at::Tensor& direct, at::Tensor& grad_h, cudaStream_t stream,
                       StepBackward&& step_backward) {
  const int64_t T = shape.T, B = shape.B, H = shape.H, steps = shape.steps_to_run();
  at::Tensor recurrent = at::empty({B, H}, grad_h.options());  // hidden_gates[t] @ w_hh
  auto take_recurrent = [&](int64_t t) {
    check_launch(op, launch_take_recurrent_gradient(step_of(compute, B, H, lengths, t), recurrent.const_data_ptr(),
                                                    pointer_or_null(direct), grad_h.mutable_data_ptr(), stream));
  };
  for (int64_t s = steps - 1; s >= 0; --s) {
    const int64_t t = time_of_step(s, T, reverse);
    if (s < T - 1) take_recurrent(reverse ? t - 1 : t + 1);
    step_backward(s, t);
    mm_in_compute_out(recurrent, in_dtype_of(hidden_gates.select(0, t), w_hh), w_hh);
  }
  if (steps > 0) take_recurrent(time_of_step(0, T, reverse));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward_cuda(const at::Tensor& grad_output_in, const at::Tensor& grad_h_n_in,
                         const at::Tensor& grad_c_n_in, const at::Tensor& x_in, const at::Tensor& h0_in,
                         const at::Tensor& c0_in, const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
                         const OptionalTensor& b_ih_in, const OptionalTensor& b_hh_in,
                         const OptionalTensor& lengths_in, bool reverse, const at::Tensor& output_in,
                         const at::Tensor& saved_in) {
  const char* op = "lstm_layer_backward";
  const at::ScalarType compute = recurrent_dtype(op, x_in);
  const LayerShape shape = check_layer(op, x_in, h0_in, &c0_in, w_ih_in, w_hh_in, b_ih_in, b_hh_in, kLstmGates);
  const int64_t T = shape.T, B = shape.B, I = shape.I, H = shape.H, G = kLstmGates * H, width = G + H;
  check_all_like(op, x_in, {{&grad_output_in, "grad_output"}, {&grad_h_n_in, "grad_h_n"},
                            {&grad_c_n_in, "grad_c_n"}, {&output_in, "output"}, {&saved_in, "saved"}});
  check_shape(op, "grad_output", grad_output_in, {T, B, H});
  check_shape(op, "grad_h_n", grad_h_n_in, {B, H});
  check_shape(op, "grad_c_n", grad_c_n_in, {B, H});
  check_shape(op, "output", output_in, {T, B, H});
  check_shape(op, "saved", saved_in, {T, B, width});
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor lengths = layer_lengths(op, lengths_in, x_in, B);
  const at::Tensor c0 = compute_in(c0_in, compute), grad_output = compute_in(grad_output_in, compute);
  const at::Tensor saved = compute_in(saved_in, compute);
  at::Tensor grad_h = copy_in(grad_h_n_in, compute), grad_c = copy_in(grad_c_n_in, compute);
  at::Tensor grad_gates = at::empty({T, B, G}, saved.options());
  const cudaStream_t stream = current_stream();
  if (const auto run = persistent_run(op, RecurrentCell::kLstm, true, shape, x_in, w_hh_in, lengths, reverse)) {
    PersistentBackwardBuffers buffers;
    buffers.gate_operand = run->operand_or_null();
    buffers.grad_output = grad_output.const_data_ptr<float>();
    buffers.saved = saved.const_data_ptr<float>();
    buffers.c0 = c0.const_data_ptr<float>();
    buffers.grad_h = grad_h.mutable_data_ptr<float>();
    buffers.grad_c = grad_c.mutable_data_ptr<float>();
    buffers.grad_gates = grad_gates.mutable_data_ptr<float>();
    check_launch(op, launch_persistent_lstm_backward(run->layer, run->plan, buffers, stream));
  } else {
    per_step_backward(op, compute, shape, lengths, reverse, w_hh_in, grad_gates, at::Tensor(), grad_h, stream,
                      [&](int64_t s, int64_t t) {
                        const at::Tensor saved_t = saved.select(0, t);
                        const int64_t t_prev = reverse ? t + 1 : t - 1;
                        const at::Tensor c_prev = s > 0 ? saved.select(0, t_prev).narrow(1, G, H) : c0;
                        check_launch(op, launch_lstm_step_backward(
                                             step_of(compute, B, H, lengths, t), grad_h.const_data_ptr(),
                                             grad_output.select(0, t).const_data_ptr(), grad_c.mutable_data_ptr(),
                                             saved_t.const_data_ptr(), width, c_prev.const_data_ptr(),
                                             c_prev.stride(0), saved_t.narrow(1, G, H).const_data_ptr(), width,
                                             grad_gates.select(0, t).mutable_data_ptr(), stream));
                      });
  }
  const auto dtype = x_in.scalar_type();
  const at::Tensor grad_gates2d = grad_gates.view({T * B, G}), grad_gates_operand = grad_gates2d.to(dtype);
  const at::Tensor previous = previous_hidden(output_in, h0_in, lengths, reverse).reshape({T * B, H});
  return {mm_in_compute(grad_gates_operand, w_ih_in).view({T, B, I}).to(dtype),
          grad_h.to(dtype),
          grad_c.to(dtype),
          mm_in_compute(grad_gates_operand.t(), x_in.reshape({T * B, I})).to(dtype),
          mm_in_compute(grad_gates_operand.t(), previous).to(dtype),
          bias_grad(b_ih_in, grad_gates2d, dtype),
          bias_grad(b_hh_in, grad_gates2d, dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_forward_cuda(
    const at::Tensor& x_in, const at::Tensor& h0_in, const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
    const OptionalTensor& b_ih_in, const OptionalTensor& b_hh_in, const OptionalTensor& lengths_in, bool reverse) {
  const char* op = "gru_layer_forward";
  const at::ScalarType compute = recurrent_dtype(op, x_in);
  const LayerShape shape = check_layer(op, x_in, h0_in, nullptr, w_ih_in, w_hh_in, b_ih_in, b_hh_in, kGruGates);
  const int64_t T = shape.T, B = shape.B, H = shape.H, G = kGruGates * H, width = 4 * H;
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  LayerForwardStart start =
      start_layer_forward(op, compute, shape, G, width, x_in, w_ih_in, b_ih_in, b_hh_in, lengths_in);
  const at::Tensor &lengths = start.lengths, &b_ih = start.b_ih, &b_hh = start.b_hh;
  at::Tensor &output = start.output, &saved = start.saved;
  at::Tensor h_state = copy_in(h0_in, compute), no_cell_state;
  const cudaStream_t stream = current_stream();
  if (const auto run = persistent_run(op, RecurrentCell::kGru, false, shape, x_in, w_hh_in, lengths, reverse)) {
    at::Tensor h_scratch = at::empty({B, H}, output.options());
    check_launch(op, launch_persistent_gru_forward(
                         run->layer, run->plan,
                         persistent_forward_buffers(start, h_state, no_cell_state, h_scratch, *run), stream));
  } else {
    const at::Tensor w_hh_t = w_hh_in.t();
    at::Tensor hidden_gates = at::empty({B, G}, output.options());
    for (int64_t s = 0; s < shape.steps_to_run(); ++s) {
      const int64_t t = time_of_step(s, T, reverse);
      mm_in_compute_out(hidden_gates, in_dtype_of(h_state, w_hh_t), w_hh_t);
      at::Tensor saved_t = saved.select(0, t);
      check_launch(op, launch_gru_step_forward(step_of(compute, B, H, lengths, t), saved_t.const_data_ptr(),
                                               saved_t.mutable_data_ptr(), hidden_gates.const_data_ptr(),
                                               pointer_or_null(b_ih), pointer_or_null(b_hh), h_state.const_data_ptr(),
                                               h_state.mutable_data_ptr(), output.select(0, t).mutable_data_ptr(),
                                               stream));
    }
  }
  const auto dtype = x_in.scalar_type();
  return {output.to(dtype), h_state.to(dtype), saved.to(dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_layer_backward_cuda(
    const at::Tensor& grad_output_in, const at::Tensor& grad_h_n_in, const at::Tensor& x_in, const at::Tensor& h0_in,
    const at::Tensor& w_ih_in, const at::Tensor& w_hh_in, const OptionalTensor& b_ih_in,
    const OptionalTensor& b_hh_in, const OptionalTensor& lengths_in, bool reverse, const at::Tensor& output_in,
    const at::Tensor& saved_in) {
  const char* op = "gru_layer_backward";
  const at::ScalarType compute = recurrent_dtype(op, x_in);
  const LayerShape shape = check_layer(op, x_in, h0_in, nullptr, w_ih_in, w_hh_in, b_ih_in, b_hh_in, kGruGates);
  const int64_t T = shape.T, B = shape.B, I = shape.I, H = shape.H, G = kGruGates * H, width = 4 * H;
  check_all_like(op, x_in, {{&grad_output_in, "grad_output"}, {&grad_h_n_in, "grad_h_n"}, {&output_in, "output"},
                            {&saved_in, "saved"}});
  check_shape(op, "grad_output", grad_output_in, {T, B, H});
  check_shape(op, "grad_h_n", grad_h_n_in, {B, H});
  check_shape(op, "output", output_in, {T, B, H});
  check_shape(op, "saved", saved_in, {T, B, width});
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor lengths = layer_lengths(op, lengths_in, x_in, B);
  const at::Tensor grad_output = compute_in(grad_output_in, compute), saved = compute_in(saved_in, compute);
  const at::Tensor previous_in = previous_hidden(output_in, h0_in, lengths, reverse);  // x's dtype, for the GEMM
  const at::Tensor previous = compute_in(previous_in, compute);
  at::Tensor grad_h = copy_in(grad_h_n_in, compute);
  at::Tensor grad_input_gates = at::empty({T, B, G}, saved.options());
  at::Tensor grad_hidden_gates = at::empty({T, B, G}, saved.options());
  at::Tensor direct = at::empty({B, H}, saved.options());  // dh' * z of the last step walked
  const cudaStream_t stream = current_stream();
  if (const auto run = persistent_run(op, RecurrentCell::kGru, true, shape, x_in, w_hh_in, lengths, reverse)) {
    PersistentBackwardBuffers buffers;
    buffers.gate_operand = run->operand_or_null();
    buffers.grad_output = grad_output.const_data_ptr<float>();
    buffers.saved = saved.const_data_ptr<float>();
    buffers.previous_h = previous.const_data_ptr<float>();
    buffers.grad_h = grad_h.mutable_data_ptr<float>();
    buffers.grad_gates = grad_hidden_gates.mutable_data_ptr<float>();
    buffers.grad_input_gates = grad_input_gates.mutable_data_ptr<float>();
    buffers.direct = direct.mutable_data_ptr<float>();
    check_launch(op, launch_persistent_gru_backward(run->layer, run->plan, buffers, stream));
  } else {
    per_step_backward(op, compute, shape, lengths, reverse, w_hh_in, grad_hidden_gates, direct, grad_h, stream,
                      [&](int64_t, int64_t t) {
                        check_launch(op, launch_gru_step_backward(
                                             step_of(compute, B, H, lengths, t), grad_h.const_data_ptr(),
                                             grad_output.select(0, t).const_data_ptr(),
                                             saved.select(0, t).const_data_ptr(), previous.select(0, t).const_data_ptr(),
                                             grad_input_gates.select(0, t).mutable_data_ptr(),
                                             grad_hidden_gates.select(0, t).mutable_data_ptr(),
                                             direct.mutable_data_ptr(), stream));
                      });
  }
  const auto dtype = x_in.scalar_type();
  const at::Tensor grad_input2d = grad_input_gates.view({T * B, G}), grad_input_operand = grad_input2d.to(dtype);
  const at::Tensor grad_hidden2d = grad_hidden_gates.view({T * B, G}), grad_hidden_operand = grad_hidden2d.to(dtype);
  return {mm_in_compute(grad_input_operand, w_ih_in).view({T, B, I}).to(dtype),
          grad_h.to(dtype),
          mm_in_compute(grad_input_operand.t(), x_in.reshape({T * B, I})).to(dtype),
          mm_in_compute(grad_hidden_operand.t(), previous_in.reshape({T * B, H})).to(dtype),
          bias_grad(b_ih_in, grad_input2d, dtype),
          bias_grad(b_hh_in, grad_hidden2d, dtype)};
}

// ---------------------------------------------------------------- fused attention-decoder step

// Whether the one-launch kernel may run: switched on, float32 / float16 /
// bfloat16 tensors of y's dtype on y's device, a kernel score and the shapes of
// csrc/ops.cpp (decoder_step_plan_on_device then applies the kernel's own limits).
// Anything else (bad input included: the composed ops name it) goes to the composed step.
bool fused_step_covers(const at::Tensor& y, const at::Tensor& h, const OptionalTensor& c, const at::Tensor& attentional,
                       const at::Tensor& keys, const at::Tensor& values, const OptionalTensor& query_weight,
                       const OptionalTensor& v, const OptionalTensor& bias, std::string_view score,
                       const OptionalTensor& lengths, const OptionalTensor& key_padding_mask, const at::Tensor& w_ih,
                       const at::Tensor& w_hh, const OptionalTensor& b_ih, const OptionalTensor& b_hh,
                       const at::Tensor& w_combine, bool input_feeding, const std::optional<int64_t>& window,
                       const OptionalTensor& position_weight, const OptionalTensor& position_v) {
  const char* setting = std::getenv("FASTATTN_CUDA_FUSED_DECODER_STEP");
  if (setting != nullptr && std::string_view(setting) == "0") return false;
  const bool additive = score == "additive";
  const at::ScalarType dtype = y.scalar_type();
  const bool kernel_dtype = dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
  if (!(additive || score == "dot" || score == "cosine") || !kernel_dtype || y.dim() != 2) return false;
  auto is_like_y = [&](const at::Tensor& t) { return t.scalar_type() == dtype && t.device() == y.device(); };
  auto absent_or = [&](const OptionalTensor& t, at::IntArrayRef shape) {
    return !present(t) || (is_like_y(*t) && t->sizes() == shape);
  };
  if (h.dim() != 2 || keys.dim() != 3 || values.dim() != 3) return false;
  const int64_t B = y.size(0), I = y.size(1), H = h.size(1), S = keys.size(1), Dk = keys.size(2);
  const int64_t Dv = values.size(2), G = (present(c) ? kLstmGates : kGruGates) * H;
  const int64_t fed = input_feeding ? H : Dv;  // the cell reads [y; h~_{t-1}] or [y; c_t]
  const bool tensors_fit =
      is_like_y(h) && h.size(0) == B && is_like_y(attentional) && attentional.sizes() == h.sizes() &&
      absent_or(c, {B, H}) && is_like_y(keys) && (keys.size(0) == B || keys.size(0) == 1) && is_like_y(values) &&
      values.size(0) == B && values.size(1) == S && is_like_y(w_ih) && w_ih.sizes() == at::IntArrayRef{G, I + fed} &&
      is_like_y(w_hh) && w_hh.sizes() == at::IntArrayRef{G, H} && absent_or(b_ih, {G}) && absent_or(b_hh, {G}) &&
      is_like_y(w_combine) && w_combine.sizes() == at::IntArrayRef{H, Dv + H} &&
      (present(query_weight) ? absent_or(query_weight, {H, Dk}) : Dk == H) &&
      (additive ? present(v) && absent_or(v, {Dk}) && absent_or(bias, {Dk}) : !present(v) && !present(bias)) &&
      (!window.has_value() || (present(position_weight) && position_weight->dim() == 2 && present(position_v) &&
                               absent_or(position_weight, {H, position_weight->size(1)}) &&
                               absent_or(position_v, {position_weight->size(1)})));
  const bool masks_fit =
      (!present(lengths) ||
       (at::isIntegralType(lengths->scalar_type(), /*includeBool=*/false) && lengths->sizes() == at::IntArrayRef{B})) &&
      (!present(key_padding_mask) ||
       (key_padding_mask->scalar_type() == at::kBool && key_padding_mask->sizes() == at::IntArrayRef{B, S}));
  return tensors_fit && masks_fit;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_decoder_step_inference_cuda(
    const at::Tensor& y, const at::Tensor& h, const OptionalTensor& c, const at::Tensor& attentional,
    const at::Tensor& keys_in, const at::Tensor& values_in, const OptionalTensor& query_weight,
    const OptionalTensor& v_in, const OptionalTensor& bias_in, std::string_view score, double scale,
    const OptionalTensor& lengths_in, const OptionalTensor& key_padding_mask_in, const at::Tensor& w_ih_in,
    const at::Tensor& w_hh_in, const OptionalTensor& b_ih_in, const OptionalTensor& b_hh_in,
    const at::Tensor& w_combine_in, bool input_feeding, std::optional<int64_t> window,
    const OptionalTensor& position_weight, const OptionalTensor& position_v_in) {
  const char* op = "attention_decoder_step_inference";
  check_step_attention(score, scale, window, position_weight, position_v_in);
  auto composed = [&] {
    return composed_decoder_step_inference(y, h, c, attentional, keys_in, values_in, query_weight, v_in, bias_in,
                                           score, scale, lengths_in, key_padding_mask_in, w_ih_in, w_hh_in, b_ih_in,
                                           b_hh_in, w_combine_in, input_feeding, window, position_weight,
                                           position_v_in);
  };
  if (!y.is_cuda() ||
      !fused_step_covers(y, h, c, attentional, keys_in, values_in, query_weight, v_in, bias_in, score, lengths_in,
                         key_padding_mask_in, w_ih_in, w_hh_in, b_ih_in, b_hh_in, w_combine_in, input_feeding, window,
                         position_weight, position_v_in)) {
    return composed();
  }
  const c10::cuda::CUDAGuard device_guard(y.device());
  const bool lstm = present(c);
  // Contiguous views (no copies for the module's tensors), alive until the launch is queued.
  const at::Tensor y_ = y.contiguous(), h_ = h.contiguous(), attentional_ = attentional.contiguous();
  const at::Tensor c_ = lstm ? c->contiguous() : at::Tensor();
  // Keys (1, S, Dk) shared by the batch (location) are read with a batch stride of 0.
  const at::Tensor keys = with_contiguous_rows(keys_in.expand({y.size(0), keys_in.size(1), keys_in.size(2)}));
  const at::Tensor values = with_contiguous_rows(values_in);
  const at::Tensor query_rows = present(query_weight) ? query_weight->t().contiguous() : at::Tensor();  // (Dk, H)
  const at::Tensor v = compute_in(v_in, at::kFloat), bias = compute_in(bias_in, at::kFloat);
  const at::Tensor lengths = layer_lengths(op, lengths_in, y, y.size(0));
  const at::Tensor key_padding_mask =
      present(key_padding_mask_in) ? key_padding_mask_in->to(y.device()).contiguous() : at::Tensor();
  const at::Tensor w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous(), w_combine = w_combine_in.contiguous();
  const at::Tensor b_ih = compute_in(b_ih_in, at::kFloat), b_hh = compute_in(b_hh_in, at::kFloat);
  // Local-p: W_p's rows (Dp, H), as query_weight's (no copy for the module's W_p^T).
  const at::Tensor position_rows = window.has_value() ? position_weight->t().contiguous() : at::Tensor();
  const at::Tensor position_v = compute_in(position_v_in, at::kFloat);

  DecoderStepProblem p;
  p.dtype = dtype_of(op, "y", y);
  p.cell = lstm ? RecurrentCell::kLstm : RecurrentCell::kGru;
  p.score = score == "additive" ? ScoreKind::kAdditive : score == "cosine" ? ScoreKind::kCosine : ScoreKind::kDot;
  p.input_feeding = input_feeding;
  p.batch = y.size(0);
  p.input_size = y.size(1);
  p.hidden = h.size(1);
  p.source_length = keys.size(1);
  p.score_dim = keys.size(2);
  p.value_dim = values.size(2);
  p.scale = static_cast<float>(scale);
  p.y = y_.const_data_ptr();
  p.h = h_.const_data_ptr();
  p.c = pointer_or_null(c_);
  p.attentional = attentional_.const_data_ptr();
  p.keys = keys.const_data_ptr();
  p.keys_batch_stride = keys.stride(0);
  p.values = values.const_data_ptr();
  p.values_batch_stride = values.stride(0);
  p.query_weight = pointer_or_null(query_rows);
  p.v = float_or_null(v);
  p.bias = float_or_null(bias);
  p.lengths = lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr;
  p.key_padding_mask = key_padding_mask.defined() ? key_padding_mask.const_data_ptr<bool>() : nullptr;
  p.w_ih = w_ih.const_data_ptr();
  p.w_hh = w_hh.const_data_ptr();
  p.b_ih = float_or_null(b_ih);
  p.b_hh = float_or_null(b_hh);
  p.w_combine = w_combine.const_data_ptr();
  p.window = window.value_or(0);
  p.position_dim = position_rows.defined() ? position_rows.size(0) : 0;
  p.position_weight = pointer_or_null(position_rows);
  p.position_v = float_or_null(position_v);
  DecoderStepPlan plan;
  check_launch(op, decoder_step_plan_on_device(p, &plan));
  if (plan.blocks == 0) return composed();

  const auto options = y.options(), scratch = options.dtype(at::kFloat);
  const int64_t B = p.batch, H = p.hidden;
  at::Tensor output = at::empty({B, H}, options), h_next = at::empty({B, H}, options);
  at::Tensor c_next = lstm ? at::empty({B, H}, options) : at::empty({0}, options);
  at::Tensor weights = at::empty({B, p.source_length}, options);
  const at::Tensor scores = at::empty({B, p.source_length}, scratch);
  const at::Tensor query = query_rows.defined() ? at::empty({B, p.score_dim}, scratch) : at::Tensor();
  const at::Tensor partial_context = at::empty({B, plan.splits, p.value_dim}, scratch);
  const at::Tensor partial_max = at::empty({B, plan.splits}, scratch);
  const at::Tensor partial_sum = at::empty({B, plan.splits}, scratch);
  const at::Tensor position = p.window > 0 ? at::empty({B, p.position_dim}, scratch) : at::Tensor();
  const at::Tensor centers = p.window > 0 ? at::empty({B}, scratch) : at::Tensor();
  const at::Tensor barrier = barrier_counter(y);
  DecoderStepBuffers buffers;
  buffers.output = output.mutable_data_ptr();
  buffers.h_next = h_next.mutable_data_ptr();
  buffers.c_next = lstm ? c_next.mutable_data_ptr() : nullptr;
  buffers.weights = weights.mutable_data_ptr();
  buffers.scores = scores.mutable_data_ptr<float>();
  buffers.query = query.defined() ? query.mutable_data_ptr<float>() : nullptr;
  buffers.partial_context = partial_context.mutable_data_ptr<float>();
  buffers.partial_max = partial_max.mutable_data_ptr<float>();
  buffers.partial_sum = partial_sum.mutable_data_ptr<float>();
  buffers.barrier = reinterpret_cast<unsigned long long*>(barrier.mutable_data_ptr<int64_t>());
  buffers.position = position.defined() ? position.mutable_data_ptr<float>() : nullptr;
  buffers.centers = centers.defined() ? centers.mutable_data_ptr<float>() : nullptr;
  check_launch(op, launch_decoder_step(p, plan, buffers, current_stream()));
  return {output, h_next, c_next, weights};
}

}  // namespace
}  // namespace cuda
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  using namespace fastattn::cuda;
  m.impl("attention_forward", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
  m.impl("sample_positions", &sample_positions_cuda);
  m.impl("hard_attention_outputs", &hard_attention_outputs_cuda);
  m.impl("hard_attention_outputs_backward", &hard_attention_outputs_backward_cuda);
  m.impl("fast_tanh", &fast_tanh_cuda);
  m.impl("lstm_cell_forward", &lstm_cell_forward_cuda);
  m.impl("lstm_cell_backward", &lstm_cell_backward_cuda);
  m.impl("gru_cell_forward", &gru_cell_forward_cuda);
  m.impl("gru_cell_backward", &gru_cell_backward_cuda);
  m.impl("lstm_layer_forward", &lstm_layer_forward_cuda);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cuda);
  m.impl("gru_layer_forward", &gru_layer_forward_cuda);
  m.impl("gru_layer_backward", &gru_layer_backward_cuda);
  m.impl("attention_decoder_step_inference", &attention_decoder_step_inference_cuda);
}
