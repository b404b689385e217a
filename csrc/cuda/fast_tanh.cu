// fast_tanh.cu: the fast_tanh op (csrc/ops.cpp) on the GPU: the project's rational
// tanh (csrc/common/fast_tanh.h, the function the float32 kernels use), elementwise
// over a float32 buffer, one element per thread (grid-stride).  Exists so that the
// GPU tests can check the approximation's error bound on the device's arithmetic.
#include "device_common.cuh"

namespace fastattn {
namespace cuda {
namespace {

__global__ void fast_tanh_kernel(const float* input, float* output, int64_t size) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    output[i] = tanh_of(input[i]);
  }
}

}  // namespace

cudaError_t launch_fast_tanh(const float* input, float* output, int64_t size, cudaStream_t stream) {
  if (size == 0) return cudaSuccess;
  const int64_t blocks = (size + 255) / 256;
  fast_tanh_kernel<<<grid_for(blocks < 65536 ? blocks : 65536), 256, 0, stream>>>(input, output, size);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastattn
