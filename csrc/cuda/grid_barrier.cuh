// grid_barrier.cuh: the grid-wide barrier of the cooperative kernels
// (persistent_recurrent.cu, decoder_step.cu): our own arrival counter (atomicAdd + spin
// on a volatile load, fenced) rather than cooperative_groups' grid.sync(), so that the
// kernels need only the runtime headers and run under the CPU emulation
// (csrc/cuda/emulation).  Only valid in a kernel launched with
// cudaLaunchCooperativeKernel (all blocks co-resident), with a counter that is zero at
// launch.
#pragma once

#include <cuda_runtime.h>

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

}  // namespace cuda
}  // namespace fastattn
