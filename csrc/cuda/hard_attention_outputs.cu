// hard_attention_outputs.cu: hard attention's outputs at the chosen positions and their
// gradients (hard_attention_outputs and its backward in csrc/ops.cpp), the rules of the CPU
// kernels (csrc/cpu/hard_attention_outputs.cpp) on the GPU, for any pair of float32 /
// float64 / float16 / bfloat16 weights and values.
//
// Fuses: a row's sum of weights, its chosen weight, the log-probability with its clamps and
// the fully-masked-row rule, the row factor (1, 0 for a row of zero weights, NaN for a NaN
// row) and the chosen value row times it, one warp per row (lanes across S, then across
// Dv), where the reference's outputs_at runs about fifteen ATen ops.  The backward: one warp
// per row writes the log-probability's gradient into the row of weights and the row's
// factor; then one block per (batch element, tile of value columns) adds its queries'
// context gradients times their factors into the chosen value rows, the queries one after
// another (no atomics: deterministic), into sums in the accumulation type that the binding
// converts.  A position outside [0, S) is never read or written at: it sets *outside,
// which the binding asserts on the device (checking it first would wait for the device).
// Not handled: rows are summed by one warp (a row of millions of positions is slow).
#include "device_common.cuh"

namespace fastattn {
namespace cuda {
namespace {

constexpr int kRowsPerBlock = 4;  // a warp per row
constexpr int kValueColumns = 256;  // a backward block's tile of value columns, one per thread

// The smallest normal of T, where the log-probability's clamps hold (torch.finfo(T).tiny).
template <typename T>
__device__ __forceinline__ Acc<T> tiny_of() { return 1.1754943508222875e-38f; }  // float32, bfloat16
template <>
__device__ __forceinline__ double tiny_of<double>() { return 2.2250738585072014e-308; }
template <>
__device__ __forceinline__ float tiny_of<__half>() { return 6.103515625e-05f; }

__device__ __forceinline__ float log_of(float x) { return logf(x); }
__device__ __forceinline__ double log_of(double x) { return log(x); }

// What a row of weights says of its chosen position (every lane of the warp gets it).
template <typename T>
struct RowOfWeights {
  using A = Acc<T>;
  A total, chosen;
  bool inside;  // the position is in [0, S)

  __device__ RowOfWeights(const T* row, int64_t source_length, int64_t position, int lane) {
    A sum = A(0);
    for (int64_t j = lane; j < source_length; j += kWarpSize) sum += to_acc(row[j]);
    total = warp_sum(sum);
    inside = position >= 0 && position < source_length;
    chosen = inside ? to_acc(row[position]) : A(0);
  }
  __device__ bool valid() const { return total != A(0); }  // a NaN row counts, as total != 0 does
  // log(w_index / sum_j w_j), each clamped below at tiny (NaN stays NaN); 0 for a zero row.
  __device__ A log_prob() const {
    const A tiny = tiny_of<T>();
    return valid() ? log_of(chosen < tiny ? tiny : chosen) - log_of(total < tiny ? tiny : total) : A(0);
  }
  // 1 for a row with weights, 0 for a zero one, NaN for a NaN one.
  __device__ float factor() const {
    if (total != total) return static_cast<float>(total);
    return valid() ? 1.0f : 0.0f;
  }
};

// Calls body(row, position, stats, lane) for each row this warp takes whose position is in
// [0, S); a position outside sets *outside and its row is skipped (never read at).
template <typename TW, typename Body>
__device__ __forceinline__ void for_each_row(const HardAttentionOutputsProblem& p, const TW* weights,
                                             const int64_t* index, int* outside, Body&& body) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t rows = p.batch * p.queries;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t position = index[row];
    const RowOfWeights<TW> stats(weights + row * p.source_length, p.source_length, position, lane);
    if (stats.inside) {
      body(row, position, stats, lane);
    } else if (lane == 0) {
      *outside = 1;
    }
  }
}

template <typename TW, typename TV>
__global__ void hard_attention_outputs_kernel(HardAttentionOutputsProblem p, const TW* weights, const int64_t* index,
                                              const TV* values, TV* context, TW* log_prob, int* outside) {
  for_each_row(p, weights, index, outside, [&](int64_t row, int64_t position, const RowOfWeights<TW>& stats, int lane) {
    if (lane == 0) log_prob[row] = from_acc<TW>(stats.log_prob());
    const Acc<TV> factor = static_cast<Acc<TV>>(stats.factor());
    const TV* value_row = values + ((row / p.queries) * p.source_length + position) * p.value_dim;
    TV* out = context + row * p.value_dim;
    for (int64_t d = lane; d < p.value_dim; d += kWarpSize) out[d] = from_acc<TV>(to_acc(value_row[d]) * factor);
  });
}

// grad_weights: in a row with weights g (e_index / w_index - 1 / sum_j w_j), each term 0
// where its clamp held (a weight or sum below tiny, or NaN); 0 in a zero row.
template <typename TW>
__global__ void hard_attention_weights_backward_kernel(HardAttentionOutputsProblem p, const TW* weights,
                                                       const int64_t* index, const TW* grad_log_prob,
                                                       TW* grad_weights, float* factor, int* outside) {
  using A = Acc<TW>;
  for_each_row(p, weights, index, outside, [&](int64_t row, int64_t position, const RowOfWeights<TW>& stats, int lane) {
    if (factor != nullptr && lane == 0) factor[row] = stats.factor();
    if (grad_log_prob == nullptr) return;
    TW* out = grad_weights + row * p.source_length;
    const A g = to_acc(grad_log_prob[row]), tiny = tiny_of<TW>();
    // d log(clamp_min(x, tiny)) / dx = 1 / x where x >= tiny, else 0 (torch's clamp_min).
    const A of_total = stats.valid() && stats.total >= tiny ? g / stats.total : A(0);
    const A of_chosen = stats.valid() && stats.chosen >= tiny ? g / stats.chosen : A(0);
    for (int64_t j = lane; j < p.source_length; j += kWarpSize) {
      out[j] = from_acc<TW>(j == position ? of_chosen - of_total : A(0) - of_total);
    }
  });
}

// sums (N, S, Dv) in Acc<TV>, zeroed by the caller: each query's grad_context row times its
// factor added into its chosen value row, a block's queries one after another.
template <typename TV>
__global__ void hard_attention_values_backward_kernel(HardAttentionOutputsProblem p, const TV* grad_context,
                                                      const int64_t* index, const float* factor, Acc<TV>* sums) {
  const int64_t tiles = (p.value_dim + kValueColumns - 1) / kValueColumns;
  for (int64_t block = blockIdx.x; block < p.batch * tiles; block += gridDim.x) {
    const int64_t n = block / tiles, d = (block % tiles) * kValueColumns + threadIdx.x;
    if (d >= p.value_dim) continue;
    for (int64_t t = 0; t < p.queries; ++t) {
      const int64_t row = n * p.queries + t, position = index[row];
      if (position < 0 || position >= p.source_length) continue;  // the weights kernel flagged it
      sums[(n * p.source_length + position) * p.value_dim + d] +=
          to_acc(grad_context[row * p.value_dim + d]) * static_cast<Acc<TV>>(factor[row]);
    }
  }
}

template <typename Body>
cudaError_t dispatch_dtype_pair(DType first, DType second, Body&& body) {
  return dispatch_dtype(first, [&](auto a) { return dispatch_dtype(second, [&](auto b) { return body(a, b); }); });
}

unsigned int row_blocks(int64_t rows) { return grid_for((rows + kRowsPerBlock - 1) / kRowsPerBlock); }

}  // namespace

cudaError_t launch_hard_attention_outputs(const HardAttentionOutputsProblem& p, const void* weights,
                                          const int64_t* index, const void* values, void* context, void* log_prob,
                                          int* outside, cudaStream_t stream) {
  const int64_t rows = p.batch * p.queries;
  if (rows == 0) return cudaSuccess;
  return dispatch_dtype_pair(p.weights_dtype, p.values_dtype, [&](auto weight_element, auto value_element) {
    using TW = decltype(weight_element);
    using TV = decltype(value_element);
    hard_attention_outputs_kernel<TW, TV><<<row_blocks(rows), kRowsPerBlock * kWarpSize, 0, stream>>>(
        p, static_cast<const TW*>(weights), index, static_cast<const TV*>(values), static_cast<TV*>(context),
        static_cast<TW*>(log_prob), outside);
    return cudaGetLastError();
  });
}

cudaError_t launch_hard_attention_outputs_backward(const HardAttentionOutputsProblem& p, const void* grad_context,
                                                   const void* grad_log_prob, const void* weights,
                                                   const int64_t* index, void* grad_weights, void* grad_value_sums,
                                                   float* factor, int* outside, cudaStream_t stream) {
  const int64_t rows = p.batch * p.queries;
  if (rows == 0 || (grad_context == nullptr && grad_log_prob == nullptr)) return cudaSuccess;
  return dispatch_dtype_pair(p.weights_dtype, p.values_dtype, [&](auto weight_element, auto value_element) {
    using TW = decltype(weight_element);
    using TV = decltype(value_element);
    hard_attention_weights_backward_kernel<TW><<<row_blocks(rows), kRowsPerBlock * kWarpSize, 0, stream>>>(
        p, static_cast<const TW*>(weights), index, static_cast<const TW*>(grad_log_prob),
        static_cast<TW*>(grad_weights), grad_context != nullptr ? factor : nullptr, outside);
    if (grad_context == nullptr || p.value_dim == 0) return cudaGetLastError();
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
    const int64_t tiles = (p.value_dim + kValueColumns - 1) / kValueColumns;
    hard_attention_values_backward_kernel<TV><<<grid_for(p.batch * tiles), kValueColumns, 0, stream>>>(
        p, static_cast<const TV*>(grad_context), index, factor, static_cast<Acc<TV>*>(grad_value_sums));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fastattn
