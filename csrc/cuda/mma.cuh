// mma.cuh: the warp-level tensor-core layer of the attention kernels: the m16n8k16
// multiply-accumulate of `mma.sync` (float16 / bfloat16 operands, float accumulators;
// sm_80 and later, sm_90a included) through inline PTX, and fragment loaders on
// `ldmatrix.x4` (`.trans` for operands stored the other way round) that fill its
// operands from shared memory, and the 16-byte `cp.async` global -> shared copies
// (commit / wait groups) that stage the tiles.  No WGMMA, no TMA.
//
// Under the CPU emulation (emulate.h defines FASTATTN_CUDA_EMULATION) the lanes'
// fragments and ldmatrix row addresses meet in the warp's exchange buffer: every lane
// takes its ldmatrix registers from the rows the PTX ISA assigns it and computes its
// own accumulators from the fragment layout below, so the CPU tests exercise the same
// lane/fragment mapping as the GPU; cp.async copies wait in per-thread groups until a
// wait retires them (emulate.h), so a missing wait reads stale shared memory there too.
//
// Fragment layout (PTX ISA, mma.m16n8k16 .row.col; g = lane / 4, c = lane % 4; each
// 32-bit register holds two elements, the lower index in the low half):
//   A (16 x 16, m x k):  a[0] = A[g][2c, 2c+1]      a[1] = A[g+8][2c, 2c+1]
//                        a[2] = A[g][2c+8, 2c+9]    a[3] = A[g+8][2c+8, 2c+9]
//   B (16 x 8,  k x n):  b[0] = B[2c, 2c+1][g]      b[1] = B[2c+8, 2c+9][g]
//   C (16 x 8,  m x n):  c[0], c[1] = C[g][2c, 2c+1]    c[2], c[3] = C[g+8][2c, 2c+1]
#pragma once

#include "device_common.cuh"

namespace fastattn {
namespace cuda {

template <typename T>
struct IsBFloat16 {
  static constexpr bool value = false;
};
template <>
struct IsBFloat16<__nv_bfloat16> {
  static constexpr bool value = true;
};

__host__ __device__ __forceinline__ unsigned short bits_of(__half x) { return __half_as_ushort(x); }
__host__ __device__ __forceinline__ unsigned short bits_of(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

// Two elements of T (rounded from float) in one register, `low` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float low, float high) {
  return static_cast<uint32_t>(bits_of(from_acc<T>(low))) | (static_cast<uint32_t>(bits_of(from_acc<T>(high))) << 16);
}

// The shared-memory address of a generic pointer into shared memory (what ldmatrix
// and cp.async take).
__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
#else
  return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(pointer));
#endif
}

#if defined(FASTATTN_CUDA_EMULATION)
namespace emulated {
inline uint32_t pair_of(unsigned short low, unsigned short high) {
  return static_cast<uint32_t>(low) | (static_cast<uint32_t>(high) << 16);
}

// ldmatrix for the warp: every lane publishes its row address, then takes its
// registers from the rows of the lanes that own them (see load_matrices).
template <bool kTransposed, typename T>
void load_matrices(uint32_t (&registers)[4], const T* row) {
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, c = lane % 4;
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
    std::fprintf(stderr, "emulate: ldmatrix row address %p of lane %d is not 16-byte aligned\n",
                 static_cast<const void*>(row), lane);
    std::abort();
  }
  const unsigned char* all = static_cast<const unsigned char*>(emu::warp_publish(&row, sizeof(row)));
  auto row_of = [&](int owner) {
    const T* owned;
    std::memcpy(&owned, all + owner * emu::kWarpExchangeBytesPerLane, sizeof(owned));
    return owned;
  };
  for (int m = 0; m < 4; ++m) {
    if constexpr (kTransposed) {  // (g, c) gets column g of rows 2c, 2c + 1
      registers[m] = pair_of(bits_of(row_of(8 * m + 2 * c)[g]), bits_of(row_of(8 * m + 2 * c + 1)[g]));
    } else {  // (g, c) gets elements 2c, 2c + 1 of row g
      const T* mine = row_of(8 * m + g);
      registers[m] = pair_of(bits_of(mine[2 * c]), bits_of(mine[2 * c + 1]));
    }
  }
  emu::warp_release();
}
}  // namespace emulated
#endif

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: four 8 x 8 matrices of 16-bit
// elements from shared memory, for the whole warp.  Lane i gives the address of row
// i % 8 of matrix i / 8 (16-byte aligned); lane (g, c) receives in registers[m] row g,
// elements 2c and 2c + 1 of matrix m, or with kTransposed its elements (2c, g) and
// (2c + 1, g) (row g of the transposed matrix).
template <bool kTransposed, typename T>
__device__ __forceinline__ void load_matrices(uint32_t (&registers)[4], const T* row) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  if constexpr (kTransposed) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(registers[0]), "=r"(registers[1]), "=r"(registers[2]), "=r"(registers[3])
                 : "r"(shared_address(row)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(registers[0]), "=r"(registers[1]), "=r"(registers[2]), "=r"(registers[3])
                 : "r"(shared_address(row)));
  }
#else
  __trap();  // the launcher never runs the tensor-core kernels below sm_80
#endif
#elif defined(FASTATTN_CUDA_EMULATION)
  emulated::load_matrices<kTransposed>(registers, row);
#endif
}

// The A fragment of the 16 x 16 tile at `tile`, row-major with `stride` elements
// between rows (a multiple of 8, `tile` 16-byte aligned): one ldmatrix.x4 whose
// matrices are the quarters (rows 0-7 | 8-15) x (columns 0-7 | 8-15) in a[0..3] order.
template <typename T>
__device__ __forceinline__ void load_fragment_a(uint32_t (&a)[4], const T* tile, int stride) {
  const int lane = threadIdx.x % kWarpSize;
  load_matrices<false>(a, tile + (lane % 16) * stride + (lane / 16) * 8);
}

// The B fragments of two adjacent 16 x 8 (k x n) tiles, n = 0-7 in b[0] and n = 8-15 in
// b[1], whose columns are stored contiguously: element (k, n) at tile[n * stride + k]
// (the keys of a K tile for Q K^T, the queries of a Q tile for K Q^T).  One ldmatrix.x4.
template <typename T>
__device__ __forceinline__ void load_fragments_b(uint32_t (&b)[2][2], const T* tile, int stride) {
  const int lane = threadIdx.x % kWarpSize;
  uint32_t registers[4];
  load_matrices<false>(registers, tile + (lane % 8 + (lane / 16) * 8) * stride + (lane / 8 % 2) * 8);
  b[0][0] = registers[0];
  b[0][1] = registers[1];
  b[1][0] = registers[2];
  b[1][1] = registers[3];
}

// The same two B fragments from a tile stored row-major: element (k, n) at
// tile[k * stride + n] (the values of a V tile for P V, the queries, keys or output
// gradients of a tile when the product runs over the tile's rows).  One
// ldmatrix.x4.trans.
template <typename T>
__device__ __forceinline__ void load_fragments_b_from_rows(uint32_t (&b)[2][2], const T* tile, int stride) {
  const int lane = threadIdx.x % kWarpSize;
  uint32_t registers[4];
  load_matrices<true>(registers, tile + (lane % 16) * stride + (lane / 16) * 8);
  b[0][0] = registers[0];
  b[0][1] = registers[1];
  b[1][0] = registers[2];
  b[1][1] = registers[3];
}

#if defined(FASTATTN_CUDA_EMULATION)
namespace emulated {
inline float element_of(uint32_t pair, int high, __half) { return __half2float(__ushort_as_half(pair >> (16 * high))); }
inline float element_of(uint32_t pair, int high, __nv_bfloat16) {
  return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(pair >> (16 * high))));
}

// Operand element (row, column) of a 16 x 16 A tile from the warp's A fragments, and
// (k, n) of a 16 x 8 B tile from its B fragments, read through the layout above.
template <typename T>
float a_element(const uint32_t (*a)[4], int row, int column) {
  const int lane = (row % 8) * 4 + (column % 8) / 2;
  const int reg = (row >= 8 ? 1 : 0) + (column >= 8 ? 2 : 0);
  return element_of(a[lane][reg], column % 2, T{});
}
template <typename T>
float b_element(const uint32_t (*b)[2], int k, int n) {
  const int lane = n * 4 + (k % 8) / 2;
  return element_of(b[lane][k >= 8 ? 1 : 0], k % 2, T{});
}
}  // namespace emulated
#endif

// cp.async.cg.shared.global: 16 bytes from global `source` to shared `destination`
// (both 16-byte aligned), of which the first `source_bytes` (0 or 16) are read and the
// rest zero-filled.  Asynchronous: the bytes are there once a wait_copies of this
// thread retires the group that commit_copies closed after it (other threads see them
// after a __syncthreads that follows that wait).
__device__ __forceinline__ void copy_async_16(void* destination, const void* source, int source_bytes) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(destination)), "l"(source),
               "r"(source_bytes));
#else
  __trap();
#endif
#elif defined(FASTATTN_CUDA_EMULATION)
  emu::copy_async(destination, source, 16, source_bytes);
#endif
}

// cp.async.commit_group: the thread's copies started since the last commit form a group.
__device__ __forceinline__ void commit_copies() {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
#elif defined(FASTATTN_CUDA_EMULATION)
  emu::commit_copies();
#endif
}

// cp.async.wait_group kPending: waits until at most the kPending newest groups of the
// thread are still in flight.
template <int kPending>
__device__ __forceinline__ void wait_copies() {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
#elif defined(FASTATTN_CUDA_EMULATION)
  emu::wait_copies(kPending);
#endif
}

// c += A B for one warp (every lane calls it with its fragments).  T: __half or
// __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  if constexpr (IsBFloat16<T>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();  // the launcher never runs the tensor-core kernels below sm_80
#endif
#elif defined(FASTATTN_CUDA_EMULATION)
  struct Fragments {
    uint32_t a[4];
    uint32_t b[2];
  };
  static_assert(sizeof(Fragments) <= emu::kWarpExchangeBytesPerLane, "the fragments must fit the exchange");
  const Fragments mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  const unsigned char* all = static_cast<const unsigned char*>(emu::warp_publish(&mine, sizeof(mine)));
  uint32_t warp_a[kWarpSize][4], warp_b[kWarpSize][2];
  for (int lane = 0; lane < kWarpSize; ++lane) {
    Fragments theirs;
    std::memcpy(&theirs, all + lane * emu::kWarpExchangeBytesPerLane, sizeof(theirs));
    for (int r = 0; r < 4; ++r) warp_a[lane][r] = theirs.a[r];
    for (int r = 0; r < 2; ++r) warp_b[lane][r] = theirs.b[r];
  }
  emu::warp_release();
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, col = lane % 4;
  for (int r = 0; r < 4; ++r) {
    const int row = g + (r >= 2 ? 8 : 0), n = 2 * col + r % 2;
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) sum += emulated::a_element<T>(warp_a, row, k) * emulated::b_element<T>(warp_b, k, n);
    c[r] += sum;
  }
#endif
}

}  // namespace cuda
}  // namespace fastattn
