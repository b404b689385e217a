// shared_memory_opt_in.h: a kernel's opt-in to more dynamic shared memory than the
// default 48 KiB a block (cudaFuncAttributeMaxDynamicSharedMemorySize), for the launchers.
// The attribute is the kernel's on the current device, for every host thread at once: a
// launcher that set it to its own size before each launch could have it lowered by
// another thread's smaller launch of the same kernel between its two calls, and its
// launch would then fail ('invalid argument').  opt_in_shared_bytes only ever raises it,
// under a lock, and remembers what each (kernel, device) was given: once it returns
// cudaSuccess the launch fits whatever other threads do, and a size already given costs
// no driver call.  Host code only; CUDA runtime and the C++ standard library.
#pragma once

#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>

namespace fastattn {
namespace cuda {

constexpr size_t kDefaultSharedBytes = 48 * 1024;  // what a launch may take without opting in

inline cudaError_t opt_in_shared_bytes(const void* kernel, size_t bytes) {
  if (bytes <= kDefaultSharedBytes) return cudaSuccess;
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> given;
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& allowed = given[{kernel, device}];
  if (bytes <= allowed) return cudaSuccess;
  status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (status == cudaSuccess) allowed = bytes;
  return status;
}

template <typename... Params>
cudaError_t opt_in_shared_bytes(void (*kernel)(Params...), size_t bytes) {
  return opt_in_shared_bytes(reinterpret_cast<const void*>(kernel), bytes);
}

}  // namespace cuda
}  // namespace fastattn
