// CPU kernels of hard_attention_outputs and its backward (schemas in csrc/ops.cpp): hard
// attention's outputs at the chosen positions, fastattn.reference.hard.outputs_at in one
// pass over the weights and one over the chosen value rows.
//
// Fuses: the row sum of the weights, the chosen weight, the log-probability with its
// clamps and the fully-masked-row rule, the row factor (1, 0 for a row of zero weights,
// NaN for a NaN row) and the gather of the chosen values scaled by it, where the reference
// runs about fifteen ATen ops (two (N, T, Dv) passes among them).  The backward: the
// log-probability's gradient into each row of weights, and the context's gradient
// scatter-added into the chosen value rows, batch element by batch element.
// Argument checks: csrc/hard_attention_outputs_checks.h (shared with the CUDA binding).
// Does not handle: devices other than the CPU (csrc/cuda/hard_attention_outputs.cu; the
// triton backend has kernels of its own, fastattn.kernels.hard_attention); a gradient of a
// gradient (the autograd kernel, csrc/autograd.cpp, then differentiates
// fastattn::hard_attention_outputs_reference).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../hard_attention_outputs_checks.h"

namespace fastattn {
namespace {

constexpr int64_t kRowGrainElements = 32768;  // weights or value elements worth one task

// Rows of `width` elements a task of at::parallel_for takes.
int64_t rows_per_task(int64_t width) { return std::max<int64_t>(1, kRowGrainElements / std::max<int64_t>(1, width)); }

// What a row of weights says of its chosen position (as outputs_at computes it): the row's
// sum, the chosen weight and the clamp both take in the log-probability (the weights'
// dtype's smallest normal, torch.finfo(dtype).tiny).
template <typename scalar_t>
struct RowOfWeights {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t total, chosen;
  static acc_t tiny() { return static_cast<acc_t>(std::numeric_limits<scalar_t>::min()); }

  RowOfWeights(const scalar_t* row, int64_t source_length, int64_t position) {
    double sum = 0;
    for (int64_t j = 0; j < source_length; ++j) sum += static_cast<double>(row[j]);
    total = static_cast<acc_t>(sum);
    chosen = static_cast<acc_t>(row[position]);
  }
  // A row with weights (a NaN row counts, as total != 0 does in the reference).
  bool valid() const { return total != acc_t(0); }
  // log(w_index / sum_j w_j), each clamped below at tiny (NaN stays NaN); 0 for a zero row.
  acc_t log_prob() const {
    return valid() ? std::log(std::max(chosen, tiny())) - std::log(std::max(total, tiny())) : acc_t(0);
  }
  // 1 for a row with weights, 0 for a zero one, NaN for a NaN one.
  float factor() const {
    if (std::isnan(total)) return std::numeric_limits<float>::quiet_NaN();
    return valid() ? 1.0f : 0.0f;
  }
};

// Refuses an index outside [0, S) before any row is read at it.
void check_index_range(const char* op, const at::Tensor& index, int64_t source_length) {
  const int64_t* data = index.const_data_ptr<int64_t>();
  std::atomic<bool> outside{false};
  at::parallel_for(0, index.numel(), 65536, [&](int64_t begin, int64_t end) {
    bool any = false;
    for (int64_t i = begin; i < end; ++i) any |= data[i] < 0 || data[i] >= source_length;
    if (any) outside.store(true, std::memory_order_relaxed);
  });
  TORCH_CHECK_VALUE(!outside.load(), op, ": index must hold positions in [0, S=", source_length, ")");
}

// factor (rows,) float: each row's factor; with log_prob given, each row's log-probability too.
void row_factors(const at::Tensor& weights, const int64_t* index, float* factor, at::Tensor* log_prob) {
  const int64_t rows = weights.size(0) * weights.size(1), source_length = weights.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(), "hard_attention_outputs", [&] {
    const scalar_t* data = weights.const_data_ptr<scalar_t>();
    scalar_t* log_prob_data = log_prob != nullptr ? log_prob->mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, rows_per_task(source_length), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const RowOfWeights<scalar_t> stats(data + row * source_length, source_length, index[row]);
        factor[row] = stats.factor();
        if (log_prob_data != nullptr) log_prob_data[row] = static_cast<scalar_t>(stats.log_prob());
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> hard_attention_outputs_cpu(const at::Tensor& weights_in, const at::Tensor& index_in,
                                                              const at::Tensor& values_in) {
  static constexpr char op[] = "hard_attention_outputs";
  check_hard_attention_outputs(op, weights_in, index_in, values_in, c10::DeviceType::CPU);
  const at::Tensor weights = weights_in.contiguous(), index = index_in.contiguous(), values = values_in.contiguous();
  const int64_t batch = weights.size(0), queries = weights.size(1), source_length = weights.size(2);
  const int64_t value_dim = values.size(2), rows = batch * queries;
  at::Tensor context = at::empty({batch, queries, value_dim}, values.options());
  at::Tensor log_prob = at::empty({batch, queries}, weights.options());
  if (rows == 0) return {context, log_prob};
  check_index_range(op, index, source_length);
  const int64_t* chosen = index.const_data_ptr<int64_t>();
  std::vector<float> factor(rows);
  row_factors(weights, chosen, factor.data(), &log_prob);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* value_data = values.const_data_ptr<scalar_t>();
    scalar_t* out = context.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, rows_per_task(value_dim), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* value_row = value_data + ((row / queries) * source_length + chosen[row]) * value_dim;
        scalar_t* out_row = out + row * value_dim;
        const acc_t row_factor = static_cast<acc_t>(factor[row]);
        for (int64_t d = 0; d < value_dim; ++d) {
          out_row[d] = static_cast<scalar_t>(static_cast<acc_t>(value_row[d]) * row_factor);
        }
      }
    });
  });
  return {context, log_prob};
}

// grad_weights (N, T, S) from grad_log_prob: in a row with weights, g (e_index / w_index -
// 1 / sum_j w_j), each term 0 where the clamp held (a weight or sum below tiny, or NaN);
// 0 in a zero row.  grad_values (N, S, Dv), in grad_context's dtype (the values'): each row's
// grad_context times its factor, added into the chosen value row.  Either is empty when its
// output gradient is absent (the values themselves are not needed).
std::tuple<at::Tensor, at::Tensor> hard_attention_outputs_backward_cpu(
    const std::optional<at::Tensor>& grad_context_in, const std::optional<at::Tensor>& grad_log_prob_in,
    const at::Tensor& weights_in, const at::Tensor& index_in) {
  static constexpr char op[] = "hard_attention_outputs_backward";
  check_hard_attention_outputs_backward(op, grad_context_in, grad_log_prob_in, weights_in, index_in,
                                        c10::DeviceType::CPU);
  const at::Tensor weights = weights_in.contiguous(), index = index_in.contiguous();
  const int64_t batch = weights.size(0), queries = weights.size(1), source_length = weights.size(2);
  const int64_t rows = batch * queries;
  const bool context_grad = grad_context_in.has_value() && grad_context_in->defined();
  const bool log_prob_grad = grad_log_prob_in.has_value() && grad_log_prob_in->defined();
  const at::TensorOptions value_options = context_grad ? grad_context_in->options() : weights.options();
  const int64_t value_dim = context_grad ? grad_context_in->size(2) : 0;
  at::Tensor grad_weights = log_prob_grad ? at::empty_like(weights) : at::empty({0}, weights.options());
  at::Tensor grad_values =
      context_grad ? at::zeros({batch, source_length, value_dim}, value_options) : at::empty({0}, value_options);
  if (rows == 0 || (!context_grad && !log_prob_grad)) return {grad_weights, grad_values};
  check_index_range(op, index, source_length);
  const int64_t* chosen = index.const_data_ptr<int64_t>();
  std::vector<float> factor(context_grad ? rows : 0);

  if (log_prob_grad) {
    const at::Tensor grad_log_prob = grad_log_prob_in->contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(), op, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* data = weights.const_data_ptr<scalar_t>();
      const scalar_t* grad = grad_log_prob.const_data_ptr<scalar_t>();
      scalar_t* out = grad_weights.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, rows, rows_per_task(source_length), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const RowOfWeights<scalar_t> stats(data + row * source_length, source_length, chosen[row]);
          if (context_grad) factor[row] = stats.factor();
          scalar_t* out_row = out + row * source_length;
          if (!stats.valid()) {
            std::fill(out_row, out_row + source_length, scalar_t(0));
            continue;
          }
          const acc_t g = static_cast<acc_t>(grad[row]), tiny = RowOfWeights<scalar_t>::tiny();
          // d log(clamp_min(x, tiny)) / dx = 1 / x where x >= tiny, else 0 (torch's clamp_min).
          const acc_t of_total = stats.total >= tiny ? g / stats.total : acc_t(0);
          const acc_t of_chosen = stats.chosen >= tiny ? g / stats.chosen : acc_t(0);
          const scalar_t rest = static_cast<scalar_t>(-of_total);
          std::fill(out_row, out_row + source_length, rest);
          out_row[chosen[row]] = static_cast<scalar_t>(of_chosen - of_total);
        }
      });
    });
  } else {
    row_factors(weights, chosen, factor.data(), nullptr);
  }

  if (context_grad) {
    const at::Tensor grad_context = grad_context_in->contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_context.scalar_type(), op, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* grad = grad_context.const_data_ptr<scalar_t>();
      // Added up in acc_t (float for float16 / bfloat16), rounded once at the end.
      const at::TensorOptions sum_options = value_options.dtype(c10::CppTypeToScalarType<acc_t>::value);
      at::Tensor sums = std::is_same_v<acc_t, scalar_t> ? grad_values : at::zeros(grad_values.sizes(), sum_options);
      acc_t* out = sums.mutable_data_ptr<acc_t>();
      // Tasks own batch elements, so no two add into one value row.
      at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          for (int64_t t = 0; t < queries; ++t) {
            const int64_t row = n * queries + t;
            const acc_t row_factor = static_cast<acc_t>(factor[row]);
            const scalar_t* grad_row = grad + row * value_dim;
            acc_t* out_row = out + (n * source_length + chosen[row]) * value_dim;
            for (int64_t d = 0; d < value_dim; ++d) out_row[d] += static_cast<acc_t>(grad_row[d]) * row_factor;
          }
        }
      });
      if (!std::is_same_v<acc_t, scalar_t>) grad_values.copy_(sums);
    });
  }
  return {grad_weights, grad_values};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("hard_attention_outputs", &fastattn::hard_attention_outputs_cpu);
  m.impl("hard_attention_outputs_backward", &fastattn::hard_attention_outputs_backward_cpu);
}
