// sample_positions.cu: hard attention's choice of one position per row of weights
// (sample_positions in csrc/ops.cpp), float32 / float64 / float16 / bfloat16 weights.
//
// One thread per row runs the rule of csrc/common/sampling_math.h (the CPU kernel's):
// a draw from weights / sum(weights) given a uniform number, or the first argmax.
// The uniforms come from the caller (the binding draws them with torch's CUDA
// generator, a Philox stream, so seeds and generators behave as in the rest of torch).
// Not handled: rows are walked sequentially (two passes over S per row): fine for the
// (N, T) rows of hard attention, slow for one row of millions of positions.
#include "device_common.cuh"

#include "../common/sampling_math.h"

namespace fastattn {
namespace cuda {
namespace {

struct WeightToDouble {
  template <typename T>
  __device__ double operator()(T weight) const { return static_cast<double>(to_acc(weight)); }
};

template <typename T>
__global__ void sample_positions_kernel(const T* weights, int64_t rows, int64_t source_length,
                                        const double* uniforms, int64_t* index) {
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T* row_weights = weights + row * source_length;
    index[row] = uniforms != nullptr ? draw_position(row_weights, source_length, uniforms[row], WeightToDouble{})
                                     : argmax_position(row_weights, source_length, WeightToDouble{});
  }
}

}  // namespace

cudaError_t launch_sample_positions(DType dtype, const void* weights, int64_t rows, int64_t source_length,
                                    const double* uniforms, int64_t* index, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (source_length == 0) return cudaMemsetAsync(index, 0, sizeof(int64_t) * rows, stream);
  return dispatch_dtype(dtype, [&](auto element) -> cudaError_t {
    using T = decltype(element);
    const int64_t blocks = (rows + 127) / 128;
    sample_positions_kernel<T><<<grid_for(blocks < 65536 ? blocks : 65536), 128, 0, stream>>>(
        static_cast<const T*>(weights), rows, source_length, uniforms, index);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fastattn
