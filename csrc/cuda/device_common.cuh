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

// The cosine's norm floor for elements of type T, the reference's cosine_norm_floor:
// float16's smallest normal number for float16 (in which 1 / 1e-8, a zero row's gradient
// factor, overflows to inf), else 1e-8.
template <typename T>
__host__ __device__ constexpr Acc<T> cosine_floor_of() {
  return cosine_norm_floor<Acc<T>>();
}
template <>
__host__ __device__ constexpr float cosine_floor_of<__half>() {
  return 0x1p-14f;
}

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

// Rows of `dim` elements summed with a weight per row by a block of `threads` threads (a
// context from its values, a query's gradient from its keys): `lanes` threads cover a
// row, vec elements each, and the block's `groups` groups of them (at most max_groups)
// take the rows in turn (row c to group c % groups), each accumulating its own partial
// sum over kRowUnroll rows' loads in flight (add_rows_in_turn), so that a short row
// still keeps every thread loading.  Such a pass is memory-bound: what it needs is bytes
// in flight.
constexpr int kRowUnroll = 8;

struct RowGroups {
  int lanes;   // threads per row
  int groups;  // partial sums, 1..max_groups
};

__host__ __device__ inline RowGroups row_groups(int64_t dim, int vec, int threads, int max_groups) {
  int64_t lanes = (dim + vec - 1) / vec;
  lanes = lanes < 1 ? 1 : (lanes > threads ? threads : lanes);
  const int groups = static_cast<int>(threads / lanes);
  return {static_cast<int>(lanes), groups < max_groups ? groups : max_groups};
}

// sum += weight * value, skipped for a zero weight (a masked partner, or a Gaussian
// that underflowed), whose row may hold anything.
template <int kVec, typename A>
__device__ __forceinline__ void add_weighted(A weight, const A (&value)[kVec], A (&sum)[kVec]) {
#pragma unroll
  for (int i = 0; i < kVec; ++i) sum[i] += weight != A(0) ? weight * value[i] : A(0);
}

// The rows c = first, first + step, ... below count of one thread: load(c, row) fetches
// row c's kVec elements and add(c, row) uses them, kRowUnroll rows' loads issued before
// the first of them is used.
template <int kVec, typename A, typename Load, typename Add>
__device__ __forceinline__ void add_rows_in_turn(int first, int step, int count, Load&& load, Add&& add) {
  int c = first;
  for (; c + (kRowUnroll - 1) * step < count; c += kRowUnroll * step) {
    A row[kRowUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) load(c + u * step, row[u]);
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) add(c + u * step, row[u]);
  }
  for (; c < count; c += step) {
    A row[kVec];
    load(c, row);
    add(c, row);
  }
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
