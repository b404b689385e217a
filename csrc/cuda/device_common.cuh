// device_common.cuh: small device helpers shared by the .cu files: element types and
// their accumulation type, conversions, 16-byte packed loads, warp and block sums,
// and the dispatch from DType to a C++ type.  CUDA toolkit headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "launch.h"

namespace fastattn {
namespace cuda {

constexpr int kWarpSize = 32;

// Accumulation type: float for float32 / float16 / bfloat16, double for float64.
template <typename T>
struct AccumulateOf {
  using type = float;
};
template <>
struct AccumulateOf<double> {
  using type = double;
};
template <typename T>
using Acc = typename AccumulateOf<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename T>
__device__ __forceinline__ T from_acc(double x) { return x; }  // double only

// kVec consecutive elements in one load: 16 bytes when kVec = 16 / sizeof(T) (the
// caller guarantees the alignment; a GPU faults without it, the CPU emulation records
// cudaErrorMisalignedAddress), one element when kVec = 1.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T element[kVec];
};

template <int kVec, typename T>
__device__ __forceinline__ void load_pack(const T* source, Acc<T> (&out)[kVec]) {
#if defined(FASTATTN_CUDA_EMULATION)
  emu::expect_aligned(source, sizeof(Pack<T, kVec>));
  Pack<T, kVec> pack;  // by memcpy: the host's aligned vector load of it would fault
  std::memcpy(&pack, source, sizeof(pack));
#else
  const Pack<T, kVec> pack = *reinterpret_cast<const Pack<T, kVec>*>(source);
#endif
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = to_acc(pack.element[i]);
}

// kVec accumulators to `destination` in T (one 16-byte store when kVec = 16 / sizeof(T)).
template <int kVec, typename T>
__device__ __forceinline__ void store_pack(T* destination, const Acc<T> (&values)[kVec]) {
  Pack<T, kVec> pack;
#pragma unroll
  for (int i = 0; i < kVec; ++i) pack.element[i] = from_acc<T>(values[i]);
#if defined(FASTATTN_CUDA_EMULATION)
  emu::expect_aligned(destination, sizeof(pack));
  std::memcpy(destination, &pack, sizeof(pack));
#else
  *reinterpret_cast<Pack<T, kVec>*>(destination) = pack;
#endif
}

// A wide access made without load_pack / store_pack (float4, uint4 on global or shared
// memory): the CPU emulation records a misaligned one as it does theirs.
__device__ __forceinline__ void expect_aligned(const void* address, size_t bytes) {
#if defined(FASTATTN_CUDA_EMULATION)
  emu::expect_aligned(address, bytes);
#endif
}

// The widest load for T: 16 bytes.
template <typename T>
constexpr int kWideVec = static_cast<int>(16 / sizeof(T));

__host__ __device__ inline bool aligned16(const void* pointer) {
  return (reinterpret_cast<uintptr_t>(pointer) & 15u) == 0;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Sum over the block (every thread gets it).  scratch: >= blockDim.x / 32 elements;
// the call synchronises the block twice, so every thread must reach it.
template <typename A>
__device__ __forceinline__ A block_sum(A value, A* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  value = warp_sum(value);
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  A total = A(0);
  for (int w = 0; w < static_cast<int>(blockDim.x) / kWarpSize; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// Dynamic shared memory rounded up to whole 16-byte vectors.  nvcc may widen the loads of
// an unrolled loop's last elements into one 16-byte load: on an H200, compute-sanitizer's
// memcheck saw combine_splits_kernel read 16 bytes from a 12-byte allocation (3 splits).
inline size_t whole_shared_vectors(size_t bytes) { return (bytes + 15) / 16 * 16; }

// A grid size for `work` items of one block each, within the grid's x limit
// (kernels loop over the remainder).
inline unsigned int grid_for(int64_t work) {
  const int64_t limit = 2147483647;
  return static_cast<unsigned int>(work < 1 ? 1 : (work < limit ? work : limit));
}

// Calls body(T{}) with T the C++ type of dtype.
template <typename Body>
cudaError_t dispatch_dtype(DType dtype, Body&& body) {
  switch (dtype) {
    case DType::kFloat32:
      return body(float{});
    case DType::kFloat64:
      return body(double{});
    case DType::kFloat16:
      return body(__half{});
    case DType::kBFloat16:
      return body(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastattn
