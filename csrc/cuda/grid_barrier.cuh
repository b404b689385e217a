// grid_barrier.cuh: the grid-wide barrier of the cooperative kernels
// (persistent_recurrent.cu, decoder_step.cu): our own arrival counter (atomicAdd + spin
// on a volatile load, fenced) rather than cooperative_groups' grid.sync(), so that the
// kernels need only the runtime headers and run under the CPU emulation
// (csrc/cuda/emulation).  Only valid in a kernel launched with
// cudaLaunchCooperativeKernel (all blocks co-resident), with a counter that is zero at
// launch.
#pragma once

#include <cuda_runtime.h>

#include "shared_memory_opt_in.h"

namespace fastattn {
namespace cuda {

// Every block waits until all blocks have arrived `arrivals / gridDim.x` times.  The
// fences order the block's writes before its arrival and the others' writes before
// what the block reads after it (data shared across blocks is read with __ldcg).
__device__ __forceinline__ void grid_barrier(unsigned long long* counter, unsigned long long arrivals) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(counter, 1ull);
    while (*static_cast<volatile unsigned long long*>(counter) < arrivals) __nanosleep(32);
    __threadfence();
  }
  __syncthreads();
}

// What a cooperative launch on the current device may use: its multiprocessors and the
// dynamic shared memory a block may opt in to; cooperative is 0 when the device cannot
// launch cooperative kernels.
struct CooperativeDevice {
  int multiprocessors = 0;
  int shared_optin = 0;
  int cooperative = 0;
};

inline cudaError_t query_cooperative_device(CooperativeDevice* device) {
  *device = CooperativeDevice{};
  int id = 0;
  cudaError_t status = cudaGetDevice(&id);
  if (status == cudaSuccess) {
    status = cudaDeviceGetAttribute(&device->multiprocessors, cudaDevAttrMultiProcessorCount, id);
  }
  if (status == cudaSuccess) {
    status = cudaDeviceGetAttribute(&device->shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, id);
  }
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&device->cooperative, cudaDevAttrCooperativeLaunch, id);
  return status;
}

// How many blocks of `kernel` (`threads` each, `shared_bytes` of dynamic shared memory,
// opted in here) fit on one multiprocessor at once.
template <typename Kernel>
cudaError_t resident_blocks_per_multiprocessor(Kernel kernel, int threads, int64_t shared_bytes, int* blocks) {
  *blocks = 0;
  cudaError_t status = opt_in_shared_bytes(kernel, static_cast<size_t>(shared_bytes));
  if (status == cudaSuccess) {
    status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, threads, static_cast<size_t>(shared_bytes));
  }
  return status;
}

}  // namespace cuda
}  // namespace fastattn
