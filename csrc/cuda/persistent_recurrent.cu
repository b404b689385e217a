// persistent_recurrent.cu: the recurrent loop of a whole LSTM / GRU layer (one
// direction), forward and backward (BPTT), in ONE persistent kernel launch per call.
// The recurrent GEMM runs on one of two policies: float32 FMAs (W_hh and the operands in
// float32, exact float32 results) or the tensor cores (W_hh and the operands in
// float16 / bfloat16, mma.cuh's m16n8k16 with float32 accumulation, sm_80 and later).
// Everything else (the pointwise cell math, c, saved, output, the gate gradients) is
// float32 either way; the binding sends float64 to the per-step path.
//
// Each block owns `units_per_block` consecutive hidden units and keeps the W_hh entries
// of them in shared memory for the whole sequence: forward, the gate rows of its units
// (all gates), backward, the columns of its units.  Per time step a block computes its
// slice of h_{t-1} W_hh^T (forward) or of grad_gates_t W_hh (backward) from the full
// operand matrix in global memory (read at L2 with __ldcg: written by other blocks),
// applies the fused pointwise (recurrent_cell_math.cuh) to its units, writes them, and
// waits at a grid-wide barrier.  Operands: float32 reads h from the two (B, H) halves of
// the state double buffer and the gate gradients from their (T, B, G) slots; the tensor
// cores read them as float16 / bfloat16 copies that the pointwise writes next to the
// float32 results, h into a (2, B, H) and the gate gradients into a (2, B, G) ping-pong
// buffer.  Either way one barrier per step suffices.  Layouts, `saved` and lengths
// semantics are those of the per-step path (recurrent_pointwise.cu,
// csrc/cpu/recurrent.cpp).
//
// Grid barrier: our own arrival counter (atomicAdd + spin on a volatile load, fenced),
// launched with cudaLaunchCooperativeKernel.  The cooperative launch guarantees that all
// blocks are co-resident (it fails with cudaErrorCooperativeLaunchTooLarge instead of
// deadlocking), and the plan asks for at most one block per SM after an occupancy check.
// The barrier is ours rather than cooperative_groups' grid.sync() so that this file
// needs only the runtime headers and runs under the CPU emulation (csrc/cuda/emulation).
//
// The block GEMM (batch rows in passes of 64, K in chunks through two shared-memory
// stage buffers: the next chunk's L2 loads are in registers while the current chunk is
// multiplied).  FmaGemm: chunks of 32, each thread a 4 x 4 register tile (float4 loads).
// TensorCoreGemm: chunks of 256 in 16-byte groups, the W_hh slice stored column by
// column, both operands' fragments through ldmatrix.x4 (mma.cuh), each warp some 16 x 8
// output tiles; with fewer tiles than warps the warps split K and reduce their partial
// sums in shared memory.  Shared-memory rows are padded against bank conflicts.  Not
// handled: float64, LSTM projections (proj_size), shapes whose W_hh slice does not fit
// in shared memory (the plan says so; the binding falls back to per-step GEMMs +
// recurrent_pointwise.cu), cp.async, WGMMA.
#include "grid_barrier.cuh"
#include "mma.cuh"
#include "recurrent_cell_math.cuh"
#include "shared_memory_opt_in.h"

namespace fastattn {
namespace cuda {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kPassRows = 64;  // batch rows per GEMM pass

__host__ __device__ constexpr int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}
__host__ __device__ constexpr int gates_of(RecurrentCell cell) { return cell == RecurrentCell::kLstm ? 4 : 3; }

// The GEMM's shape in a block: K (depth, padded to the policy's chunk) and the owned
// output columns (padded to its column tile).  Forward: K = H, columns = gate rows of
// the owned units (gate-major: column gate * U + u).  Backward: K = gates * H, columns =
// the owned units.
struct BlockGemmShape {
  int64_t depth, padded_depth, columns;
};
template <typename Gemm>
__host__ __device__ inline BlockGemmShape block_gemm_shape(RecurrentCell cell, bool backward, int64_t hidden,
                                                           int64_t units) {
  const int64_t depth = backward ? gates_of(cell) * hidden : hidden;
  return {depth, round_up(depth, Gemm::kChunk),
          round_up(backward ? units : gates_of(cell) * units, Gemm::kColumnTile)};
}

// float32 FMAs: W_hh slice [k][column] in shared memory, operands read as float32 (the
// h double buffer forward, the gate gradients' (T, B, G) slots backward).
struct FmaGemm {
  using Operand = float;
  static constexpr int kChunk = 32;                 // K per staged chunk
  static constexpr int kColumnTile = 4;             // a thread's register tile: 4 rows x 4 columns
  static constexpr int kMinThreads = 64;
  static constexpr int kMaxTilesPerThread = 2;
  static constexpr int kStageStride = kPassRows + kColumnTile;  // stage row length (padding against bank conflicts)
  static constexpr int kStageElements = kChunk * kPassRows;
  static constexpr int kStageFloats = kChunk * kStageStride;    // one of the two stage buffers
  static constexpr int kMaxPrefetch = kStageElements / kMinThreads;  // a thread's share of the next chunk
  static constexpr int64_t kScratchBytes = 2 * kStageFloats * static_cast<int64_t>(sizeof(float));
  static constexpr bool kOperandBuffers = false;  // reads the float32 state and gate gradients

  __host__ __device__ static int64_t weight_index(const BlockGemmShape& shape, int64_t k, int64_t column) {
    return k * shape.columns + column;
  }
  __host__ __device__ static int64_t weights_bytes(const BlockGemmShape& shape) {
    return shape.padded_depth * shape.columns * static_cast<int64_t>(sizeof(float));
  }
  // The block size for `batch` rows (0: the columns exceed the threads' register tiles).
  static int threads_for(int64_t batch, const BlockGemmShape& shape) {
    const int64_t column_tiles = shape.columns / kColumnTile;
    if (kPassRows / kColumnTile * column_tiles > kMaxThreads * kMaxTilesPerThread) return 0;
    const int64_t row_tiles = ((batch < kPassRows ? batch : kPassRows) + kColumnTile - 1) / kColumnTile;
    const int64_t threads = round_up(row_tiles * column_tiles, kMinThreads);
    return static_cast<int>(threads < kMaxThreads ? threads : kMaxThreads);
  }
  static bool runs_with(int threads) { return threads >= kMinThreads && threads <= kMaxThreads; }

  // The operands: forward, h_{t-1} (B, H) at step s; backward, the gate gradients
  // (B, G) of step t_next, which step s + 1 wrote.
  __device__ static const float* forward_operand(const PersistentForwardBuffers& buffers, int64_t s, int64_t) {
    return s % 2 == 0 ? buffers.h_state : buffers.h_scratch;
  }
  __device__ static void store_h(const PersistentForwardBuffers&, int64_t, int64_t, int64_t, float) {}
  __device__ static const float* backward_operand(const PersistentBackwardBuffers& buffers, int64_t, int64_t t_next,
                                                  int64_t rows_by_gates) {
    return buffers.grad_gates + t_next * rows_by_gates;
  }
  __device__ static void store_gate(const PersistentBackwardBuffers&, int64_t, int64_t, int64_t, float) {}

  // out[b][c] = sum_k a[b][k] * weights[k][c] for the `rows` (<= kPassRows) rows of `a`
  // (row stride lda, k < depth, read at L2), weights (padded_depth x columns) in shared
  // memory with zero padding; out (kPassRows x columns) in shared memory.  K goes in
  // chunks through two stage buffers ([k][b]) in scratch.  Every thread of the block
  // must call it; it synchronises the block once per chunk and at the end.
  __device__ static void multiply(const float* a, int64_t lda, int64_t rows, const BlockGemmShape& shape,
                                  const float* weights, unsigned char* scratch, float* out) {
    float* stage = reinterpret_cast<float*>(scratch);
    const int64_t columns = shape.columns, column_tiles = columns / kColumnTile;
    const int64_t tiles = (rows + kColumnTile - 1) / kColumnTile * column_tiles;
    float next[kMaxPrefetch];
    auto fetch = [&](int64_t k0) {
#pragma unroll
      for (int i = 0; i < kMaxPrefetch; ++i) {
        const int e = threadIdx.x + i * blockDim.x;
        if (e >= kStageElements) break;
        const int kk = e % kChunk, b = e / kChunk;
        const int64_t k = k0 + kk;
        next[i] = b < rows && k < shape.depth ? __ldcg(a + b * lda + k) : 0.0f;
      }
    };
    float accumulator[kMaxTilesPerThread][kColumnTile][kColumnTile] = {};
    fetch(0);
    for (int64_t k0 = 0, chunk = 0; k0 < shape.padded_depth; k0 += kChunk, ++chunk) {
      // Writing this buffer is safe: its last readers (chunk - 2) passed the previous sync.
      float* current = stage + (chunk % 2) * kStageFloats;
#pragma unroll
      for (int i = 0; i < kMaxPrefetch; ++i) {
        const int e = threadIdx.x + i * blockDim.x;
        if (e >= kStageElements) break;
        current[e % kChunk * kStageStride + e / kChunk] = next[i];
      }
      __syncthreads();
      if (k0 + kChunk < shape.padded_depth) fetch(k0 + kChunk);
#pragma unroll
      for (int i = 0; i < kMaxTilesPerThread; ++i) {
        const int64_t tile = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
        if (tile >= tiles) break;
        const int64_t row0 = tile / column_tiles * kColumnTile, column0 = tile % column_tiles * kColumnTile;
#pragma unroll 4
        for (int kk = 0; kk < kChunk; ++kk) {
          const float* h_source = current + kk * kStageStride + row0;
          const float* w_source = weights + (k0 + kk) * columns + column0;
          expect_aligned(h_source, sizeof(float4));
          expect_aligned(w_source, sizeof(float4));
          const float4 h = *reinterpret_cast<const float4*>(h_source);
          const float4 w = *reinterpret_cast<const float4*>(w_source);
          const float hs[kColumnTile] = {h.x, h.y, h.z, h.w}, ws[kColumnTile] = {w.x, w.y, w.z, w.w};
#pragma unroll
          for (int r = 0; r < kColumnTile; ++r) {
#pragma unroll
            for (int c = 0; c < kColumnTile; ++c) accumulator[i][r][c] += hs[r] * ws[c];
          }
        }
      }
    }
    // out is free: its last readers (the caller's pointwise) passed the loop's syncs.
#pragma unroll
    for (int i = 0; i < kMaxTilesPerThread; ++i) {
      const int64_t tile = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
      if (tile >= tiles) break;
      const int64_t row0 = tile / column_tiles * kColumnTile, column0 = tile % column_tiles * kColumnTile;
#pragma unroll
      for (int r = 0; r < kColumnTile; ++r) {
#pragma unroll
        for (int c = 0; c < kColumnTile; ++c) out[(row0 + r) * columns + column0 + c] = accumulator[i][r][c];
      }
    }
    __syncthreads();
  }
};

// Eight consecutive 16-bit elements from global memory (read at L2: written by other
// blocks) as one 16-byte register group, zeros past `valid` (<= 0: all zero).  `wide`:
// 16-byte aligned with all eight valid: one 16-byte load on the GPU, two 8-byte loads in
// the CPU emulation (whose __ldcg is an atomic load, lock-free up to 8 bytes).
__device__ __forceinline__ uint4 load_group_at_l2(const void* source, int64_t valid, bool wide) {
  uint4 group = make_uint4(0, 0, 0, 0);
  if (valid <= 0) return group;
  if (wide) {
    expect_aligned(source, sizeof(uint4));
#if defined(__CUDA_ARCH__)
    return __ldcg(static_cast<const uint4*>(source));
#else
    const uint2 low = __ldcg(static_cast<const uint2*>(source)), high = __ldcg(static_cast<const uint2*>(source) + 1);
    return make_uint4(low.x, low.y, high.x, high.y);
#endif
  }
  const unsigned short* elements = static_cast<const unsigned short*>(source);
  uint32_t words[4] = {0, 0, 0, 0};
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    if (e < valid) words[e / 2] |= static_cast<uint32_t>(__ldcg(elements + e)) << (16 * (e % 2));
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// The mma's B fragments of two consecutive k-steps of the 32 x 8 (k x n) tile at `tile`
// whose columns are stored contiguously, element (k, n) at tile[n * stride + k] (stride
// a multiple of 8, `tile` 16-byte aligned): b[0] for k = 0-15, b[1] for k = 16-31.  One
// ldmatrix.x4 whose matrices are the 8 columns' k = 0-7, 8-15, 16-23, 24-31.
template <typename T>
__device__ __forceinline__ void load_column_fragments(uint32_t (&b)[2][2], const T* tile, int64_t stride) {
  const int lane = threadIdx.x % kWarpSize;
  uint32_t registers[4];
  load_matrices<false>(registers, tile + lane % 8 * stride + lane / 8 * 8);
  b[0][0] = registers[0];
  b[0][1] = registers[1];
  b[1][0] = registers[2];
  b[1][1] = registers[3];
}

// The tensor cores: W_hh slice [column][k] (row stride padded_depth + kSkew) in shared
// memory as T, operands read as T from the (2, B, H) / (2, B, G) ping-pong buffers, the
// m16n8k16 mma with float32 accumulators.  Always kMaxThreads threads (8 warps).
template <typename T>
struct TensorCoreGemm {
  using Operand = T;
  static constexpr int kChunk = 256;       // K per staged chunk: 32 KiB of operands in flight per block
  static constexpr int kColumnTile = 8;    // the n of m16n8k16
  static constexpr int kRowTile = 16;      // its m
  static constexpr int kStep = 16;         // its k
  static constexpr int kPairs = kChunk / (2 * kStep);  // pairs of k-steps per chunk (one B ldmatrix each)
  static constexpr int kSkew = 8;          // padding per shared row: a 16-byte shift, 4 banks
  static constexpr int kGroup = 8;         // elements per 16-byte load
  static constexpr int kStageStride = kChunk + kSkew;
  static constexpr int kStageGroups = kPassRows * kChunk / kGroup;
  static constexpr int kWarps = kMaxThreads / kWarpSize;
  static constexpr int kPrefetch = kStageGroups / kMaxThreads;  // a thread's 16-byte groups of the next chunk
  static constexpr int kMaxWarpTiles = 8;                       // output tiles (accumulators) per warp
  static_assert(kWarps <= kPairs, "every warp of a split K needs a pair of k-steps");
  static constexpr int kTileFloats = kRowTile * kColumnTile;
  static constexpr int64_t kStageBytes = static_cast<int64_t>(kPassRows) * kStageStride * sizeof(T);
  static constexpr int64_t kScratchBytes = 2 * kStageBytes + kWarps * kTileFloats * static_cast<int64_t>(sizeof(float));
  static constexpr bool kOperandBuffers = true;  // h_operand / gate_operand

  __host__ __device__ static int64_t weight_stride(const BlockGemmShape& shape) { return shape.padded_depth + kSkew; }
  __host__ __device__ static int64_t weight_index(const BlockGemmShape& shape, int64_t k, int64_t column) {
    return column * weight_stride(shape) + k;
  }
  __host__ __device__ static int64_t weights_bytes(const BlockGemmShape& shape) {
    return shape.columns * weight_stride(shape) * static_cast<int64_t>(sizeof(T));
  }
  static int threads_for(int64_t, const BlockGemmShape& shape) {
    const int64_t tiles = kPassRows / kRowTile * (shape.columns / kColumnTile);
    return tiles <= kWarps * kMaxWarpTiles ? kMaxThreads : 0;
  }
  static bool runs_with(int threads) { return threads == kMaxThreads; }

  // Forward: step s reads half s % 2 (h0 in half 0 on entry) and writes h_t into the
  // other; backward: step s writes its gate gradients into half s % 2 and reads step
  // s + 1's from the other.
  __device__ static const T* forward_operand(const PersistentForwardBuffers& buffers, int64_t s, int64_t size) {
    return static_cast<const T*>(buffers.h_operand) + (s % 2) * size;
  }
  __device__ static void store_h(const PersistentForwardBuffers& buffers, int64_t s, int64_t size, int64_t index,
                                 float h) {
    static_cast<T*>(buffers.h_operand)[((s + 1) % 2) * size + index] = from_acc<T>(h);
  }
  __device__ static const T* backward_operand(const PersistentBackwardBuffers& buffers, int64_t s, int64_t,
                                              int64_t size) {
    return static_cast<const T*>(buffers.gate_operand) + ((s + 1) % 2) * size;
  }
  __device__ static void store_gate(const PersistentBackwardBuffers& buffers, int64_t s, int64_t size, int64_t index,
                                    float value) {
    static_cast<T*>(buffers.gate_operand)[(s % 2) * size + index] = from_acc<T>(value);
  }

  // The contract of FmaGemm::multiply with `a` and weights ([column][k]) in T.  Output
  // tile i of a warp is 16 rows x 8 columns; with fewer tiles than warps, `splits`
  // warps share a tile, each taking every splits-th pair of k-steps of a chunk, and
  // their fragments meet in scratch before out.
  __device__ static void multiply(const T* a, int64_t lda, int64_t rows, const BlockGemmShape& shape,
                                  const T* weights, unsigned char* scratch, float* out) {
    T* stage = reinterpret_cast<T*>(scratch);
    float* partial = reinterpret_cast<float*>(scratch + 2 * kStageBytes);
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int64_t columns = shape.columns, stride = weight_stride(shape);
    const int column_tiles = static_cast<int>(columns / kColumnTile);
    const int row_tiles = static_cast<int>((rows + kRowTile - 1) / kRowTile), tiles = row_tiles * column_tiles;
    const int splits = tiles >= kWarps ? 1 : kWarps / tiles;
    const bool working = warp < tiles * splits;
    const int first_tile = splits == 1 ? warp : warp % tiles, split = splits == 1 ? 0 : warp / tiles;
    const bool wide = lda % kGroup == 0 && shape.depth % kGroup == 0 && aligned16(a);
    uint4 next[kPrefetch];
    auto fetch = [&](int64_t k0) {
#pragma unroll
      for (int i = 0; i < kPrefetch; ++i) {
        const int e = threadIdx.x + i * kMaxThreads;
        const int b = e / (kChunk / kGroup);
        const int64_t k = k0 + e % (kChunk / kGroup) * kGroup;
        next[i] = load_group_at_l2(a + b * lda + k, b < rows ? shape.depth - k : 0, wide);
      }
    };
    float accumulator[kMaxWarpTiles][4] = {};
    fetch(0);
    for (int64_t k0 = 0, chunk = 0; k0 < shape.padded_depth; k0 += kChunk, ++chunk) {
      // Writing this buffer is safe: its last readers (chunk - 2) passed the previous sync.
      T* current = stage + (chunk % 2) * (kStageBytes / static_cast<int64_t>(sizeof(T)));
#pragma unroll
      for (int i = 0; i < kPrefetch; ++i) {
        const int e = threadIdx.x + i * kMaxThreads;
        T* slot = current + e / (kChunk / kGroup) * kStageStride + e % (kChunk / kGroup) * kGroup;
        expect_aligned(slot, sizeof(uint4));
        *reinterpret_cast<uint4*>(slot) = next[i];
      }
      __syncthreads();
      if (k0 + kChunk < shape.padded_depth) fetch(k0 + kChunk);
      if (!working) continue;
      for (int pair = split; pair < kPairs; pair += splits) {
#pragma unroll
        for (int i = 0; i < kMaxWarpTiles; ++i) {
          const int tile = first_tile + i * kWarps;
          if (tile >= tiles || (splits > 1 && i > 0)) break;
          const int k = pair * 2 * kStep;
          uint32_t b_fragments[2][2];
          load_column_fragments(b_fragments, weights + tile % column_tiles * kColumnTile * stride + k0 + k, stride);
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            uint32_t a_fragment[4];
            load_fragment_a(a_fragment, current + tile / column_tiles * kRowTile * kStageStride + k + half * kStep,
                            kStageStride);
            mma_m16n8k16<T>(accumulator[i], a_fragment, b_fragments[half]);
          }
        }
      }
    }
    // C fragment: c[0], c[1] at (g, 2c, 2c + 1), c[2], c[3] at (g + 8, 2c, 2c + 1).
    const int g = lane / 4, c = lane % 4;
    auto store = [&](float* tile, int64_t row_stride, const float (&fragment)[4]) {
      tile[g * row_stride + 2 * c] = fragment[0];
      tile[g * row_stride + 2 * c + 1] = fragment[1];
      tile[(g + 8) * row_stride + 2 * c] = fragment[2];
      tile[(g + 8) * row_stride + 2 * c + 1] = fragment[3];
    };
    // out and partial are free: their last readers passed the loop's syncs.
    if (splits == 1) {
#pragma unroll
      for (int i = 0; i < kMaxWarpTiles; ++i) {
        const int tile = first_tile + i * kWarps;
        if (tile >= tiles) break;
        store(out + tile / column_tiles * kRowTile * columns + tile % column_tiles * kColumnTile, columns,
              accumulator[i]);
      }
    } else {
      if (working) store(partial + warp * kTileFloats, kColumnTile, accumulator[0]);  // warp = split * tiles + tile
      __syncthreads();
      for (int64_t e = threadIdx.x; e < row_tiles * kRowTile * columns; e += blockDim.x) {
        const int64_t row = e / columns, column = e % columns;
        const int64_t tile = row / kRowTile * column_tiles + column / kColumnTile;
        const int64_t within = row % kRowTile * kColumnTile + column % kColumnTile;
        float sum = 0.0f;
        for (int s = 0; s < splits; ++s) sum += partial[(s * tiles + tile) * kTileFloats + within];
        out[e] = sum;
      }
    }
    __syncthreads();
  }
};

template <typename Gemm>
int64_t shared_bytes_for(const BlockGemmShape& shape) {
  return static_cast<int64_t>(whole_shared_vectors(static_cast<size_t>(
      Gemm::weights_bytes(shape) + Gemm::kScratchBytes + kPassRows * shape.columns * static_cast<int64_t>(sizeof(float)))));
}

__device__ __forceinline__ bool is_active(const int64_t* lengths, int64_t t, int64_t b) {
  return lengths == nullptr || t < lengths[b];
}

__device__ __forceinline__ float bias_at(const float* bias, int64_t index) {
  return bias != nullptr ? bias[index] : 0.0f;
}

// The block's units [first_unit, first_unit + units) and the shared-memory carve-up:
// the W_hh slice, the GEMM's scratch, its output (kPassRows x columns floats).
template <typename Gemm>
struct BlockSlice {
  int64_t first_unit, units, units_per_block;
  BlockGemmShape shape;
  typename Gemm::Operand* weights;
  unsigned char* scratch;
  float* out;
};

template <typename Gemm>
__device__ BlockSlice<Gemm> block_slice(RecurrentCell cell, bool backward, const PersistentLayer& layer,
                                        const PersistentPlan& plan, unsigned char* shared) {
  BlockSlice<Gemm> slice;
  slice.units_per_block = plan.units_per_block;
  slice.first_unit = static_cast<int64_t>(blockIdx.x) * plan.units_per_block;
  const int64_t left = layer.hidden - slice.first_unit;
  slice.units = left < plan.units_per_block ? left : plan.units_per_block;
  slice.shape = block_gemm_shape<Gemm>(cell, backward, layer.hidden, plan.units_per_block);
  slice.weights = reinterpret_cast<typename Gemm::Operand*>(shared);
  slice.scratch = shared + Gemm::weights_bytes(slice.shape);
  slice.out = reinterpret_cast<float*>(slice.scratch + Gemm::kScratchBytes);
  return slice;
}

// weights (k, column) of the slice, zero where padded.  Forward: W_hh[gate * H + unit][k]
// at column gate * U + u; backward: W_hh[k][unit] at column u.
template <typename Gemm>
__device__ void load_weights(RecurrentCell cell, bool backward, const PersistentLayer& layer,
                             const BlockSlice<Gemm>& s) {
  using Operand = typename Gemm::Operand;
  const Operand* w_hh = static_cast<const Operand*>(layer.w_hh);
  const int64_t H = layer.hidden, U = s.units_per_block, columns = s.shape.columns;
  const int64_t total = s.shape.padded_depth * columns;
  for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
    Operand value = from_acc<Operand>(0.0f);
    int64_t k, column;
    if (backward) {  // consecutive threads: consecutive units of one W_hh row
      k = e / columns;
      column = e % columns;
      if (k < s.shape.depth && column < s.units) value = w_hh[k * H + s.first_unit + column];
    } else {  // consecutive threads: consecutive k of one W_hh row
      column = e / s.shape.padded_depth;
      k = e % s.shape.padded_depth;
      const int64_t gate = column / U, u = column % U;
      if (k < H && gate < gates_of(cell) && u < s.units) value = w_hh[(gate * H + s.first_unit + u) * H + k];
    }
    s.weights[Gemm::weight_index(s.shape, k, column)] = value;
  }
}

__device__ __forceinline__ int64_t time_of_step(const PersistentLayer& layer, int64_t s) {
  return layer.reverse ? layer.steps - 1 - s : s;
}

template <RecurrentCell kCell, typename Gemm>
__global__ void __launch_bounds__(kMaxThreads, 1)
    persistent_forward_kernel(PersistentLayer layer, PersistentPlan plan, PersistentForwardBuffers buffers) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  constexpr bool kLstm = kCell == RecurrentCell::kLstm;
  constexpr int kGates = gates_of(kCell);
  const BlockSlice<Gemm> slice = block_slice<Gemm>(kCell, false, layer, plan, shared_bytes);
  load_weights(kCell, false, layer, slice);
  const int64_t T = layer.steps, B = layer.batch, H = layer.hidden, U = slice.units_per_block;
  const int64_t G = kGates * H, width = kLstm ? G + H : 4 * H, columns = slice.shape.columns;
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = time_of_step(layer, s);
    const float* h_prev = s % 2 == 0 ? buffers.h_state : buffers.h_scratch;
    float* h_next = s % 2 == 0 ? buffers.h_scratch : buffers.h_state;
    const typename Gemm::Operand* operand = Gemm::forward_operand(buffers, s, B * H);
    for (int64_t b0 = 0; b0 < B; b0 += kPassRows) {
      const int64_t rows = B - b0 < kPassRows ? B - b0 : kPassRows;
      Gemm::multiply(operand + b0 * H, H, rows, slice.shape, slice.weights, slice.scratch, slice.out);
      for (int64_t e = threadIdx.x; e < rows * slice.units; e += blockDim.x) {
        const int64_t row = e / slice.units, u = e % slice.units;
        const int64_t b = b0 + row, j = slice.first_unit + u, index = b * H + j;
        float* saved = buffers.saved + (t * B + b) * width;
        const float h = __ldcg(h_prev + index);
        float* output = buffers.output + t * B * H + index;
        auto set_h = [&](float value) {
          h_next[index] = value;
          Gemm::store_h(buffers, s, B * H, index, value);
        };
        if (!is_active(layer.lengths, t, b)) {  // finished sequence: state kept, output 0
          for (int k = 0; k < 4; ++k) saved[k * H + j] = 0.0f;
          if (kLstm) saved[G + j] = buffers.c_state[index];
          *output = 0.0f;
          set_h(h);
          continue;
        }
        const float* hidden_row = slice.out + row * columns;
        auto input_part = [&](int k) { return saved[k * H + j] + bias_at(buffers.b_ih, k * H + j); };
        auto hidden_part = [&](int k) { return hidden_row[k * U + u] + bias_at(buffers.b_hh, k * H + j); };
        if constexpr (kLstm) {
          auto pre_activation = [&](int k) { return input_part(k) + hidden_part(k); };
          const LstmForward<float> next = lstm_forward(pre_activation(0), pre_activation(1), pre_activation(2),
                                                       pre_activation(3), buffers.c_state[index]);
          saved[j] = next.i;
          saved[H + j] = next.f;
          saved[2 * H + j] = next.g;
          saved[3 * H + j] = next.o;
          saved[G + j] = next.c;
          buffers.c_state[index] = next.c;
          *output = next.h;
          set_h(next.h);
        } else {
          const GruForward<float> next = gru_forward(input_part(0), input_part(1), input_part(2), hidden_part(0),
                                                     hidden_part(1), hidden_part(2), h);
          saved[j] = next.r;
          saved[H + j] = next.z;
          saved[2 * H + j] = next.n;
          saved[3 * H + j] = next.hidden_n;
          *output = next.h;
          set_h(next.h);
        }
      }
    }
    grid_barrier(layer.barrier, static_cast<unsigned long long>(s + 1) * gridDim.x);
  }
  if (T % 2 == 1) {  // h_n ended in the scratch half: the block copies its own units back
    for (int64_t e = threadIdx.x; e < B * slice.units; e += blockDim.x) {
      const int64_t index = e / slice.units * H + slice.first_unit + e % slice.units;
      buffers.h_state[index] = __ldcg(buffers.h_scratch + index);
    }
  }
}

// Backward of one step s (time t) for element (b, j): the gate gradients of step t (0
// for an inactive row) from grad_h (the gradient reaching h_t, without grad_output);
// the ones the recurrent GEMM reads also go to the GEMM's operand.
template <RecurrentCell kCell, typename Gemm>
__device__ __forceinline__ void step_backward(const PersistentLayer& layer, const PersistentBackwardBuffers& buffers,
                                              int64_t s, int64_t t, int64_t b, int64_t j) {
  const int64_t B = layer.batch, H = layer.hidden, G = gates_of(kCell) * H, index = b * H + j;
  const bool active = is_active(layer.lengths, t, b);
  float* hidden_row = buffers.grad_gates + (t * B + b) * G;  // LSTM's gate gradients, GRU's hidden side
  auto set_hidden = [&](int k, float value) {
    hidden_row[k * H + j] = value;
    Gemm::store_gate(buffers, s, B * G, b * G + k * H + j, value);
  };
  if constexpr (kCell == RecurrentCell::kLstm) {
    if (!active) {
      for (int k = 0; k < 4; ++k) set_hidden(k, 0.0f);
      return;
    }
    const int64_t width = 5 * H;
    const float* row = buffers.saved + (t * B + b) * width;
    const int64_t t_prev = layer.reverse ? t + 1 : t - 1;
    const float c_prev = s > 0 ? buffers.saved[(t_prev * B + b) * width + G + j] : buffers.c0[index];
    const float dh = buffers.grad_h[index] + buffers.grad_output[t * B * H + index];
    const LstmBackward<float> grad =
        lstm_backward(row[j], row[H + j], row[2 * H + j], row[3 * H + j], c_prev, row[G + j], dh, buffers.grad_c[index]);
    buffers.grad_c[index] = grad.grad_c_prev;
    set_hidden(0, grad.d_i);
    set_hidden(1, grad.d_f);
    set_hidden(2, grad.d_g);
    set_hidden(3, grad.d_o);
  } else {
    float* input_row = buffers.grad_input_gates + (t * B + b) * G;
    if (!active) {
      for (int k = 0; k < 3; ++k) {
        input_row[k * H + j] = 0.0f;
        set_hidden(k, 0.0f);
      }
      return;
    }
    const float* row = buffers.saved + (t * B + b) * 4 * H;
    const float r = row[j];
    const float dh = buffers.grad_h[index] + buffers.grad_output[t * B * H + index];
    const GruBackward<float> grad =
        gru_backward(r, row[H + j], row[2 * H + j], row[3 * H + j], buffers.previous_h[t * B * H + index], dh);
    input_row[j] = grad.d_r;
    input_row[H + j] = grad.d_z;
    input_row[2 * H + j] = grad.d_n;
    set_hidden(0, grad.d_r);
    set_hidden(1, grad.d_z);
    set_hidden(2, grad.d_n * r);
    buffers.direct[index] = grad.direct;
  }
}

// grad_h of the block's units for the rows active at step t: the recurrent gradient
// (grad_gates_t W_hh, in out) plus, for the GRU, the direct dh' * z; others keep grad_h.
template <RecurrentCell kCell, typename Gemm>
__device__ __forceinline__ void take_recurrent(const PersistentLayer& layer, const PersistentBackwardBuffers& buffers,
                                               const BlockSlice<Gemm>& slice, int64_t t, int64_t row, int64_t b,
                                               int64_t u) {
  if (!is_active(layer.lengths, t, b)) return;
  const int64_t index = b * layer.hidden + slice.first_unit + u;
  const float recurrent = slice.out[row * slice.shape.columns + u];
  buffers.grad_h[index] = kCell == RecurrentCell::kGru ? recurrent + buffers.direct[index] : recurrent;
}

template <RecurrentCell kCell, typename Gemm>
__global__ void __launch_bounds__(kMaxThreads, 1)
    persistent_backward_kernel(PersistentLayer layer, PersistentPlan plan, PersistentBackwardBuffers buffers) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const BlockSlice<Gemm> slice = block_slice<Gemm>(kCell, true, layer, plan, shared_bytes);
  load_weights(kCell, true, layer, slice);
  const int64_t T = layer.steps, B = layer.batch, G = gates_of(kCell) * layer.hidden;
  for (int64_t s = T - 1; s >= -1; --s) {  // s = -1: only the gradient reaching h0
    const int64_t t = s >= 0 ? time_of_step(layer, s) : -1;
    const int64_t t_next = time_of_step(layer, s + 1);  // the step whose gate gradients flow into h_t
    const bool has_next = s < T - 1;
    const typename Gemm::Operand* operand = has_next ? Gemm::backward_operand(buffers, s, t_next, B * G) : nullptr;
    for (int64_t b0 = 0; b0 < B; b0 += kPassRows) {
      const int64_t rows = B - b0 < kPassRows ? B - b0 : kPassRows;
      if (has_next) Gemm::multiply(operand + b0 * G, G, rows, slice.shape, slice.weights, slice.scratch, slice.out);
      for (int64_t e = threadIdx.x; e < rows * slice.units; e += blockDim.x) {
        const int64_t row = e / slice.units, u = e % slice.units, b = b0 + row;
        if (has_next) take_recurrent<kCell>(layer, buffers, slice, t_next, row, b, u);
        if (s >= 0) step_backward<kCell, Gemm>(layer, buffers, s, t, b, slice.first_unit + u);
      }
    }
    if (s >= 0) grid_barrier(layer.barrier, static_cast<unsigned long long>(T - s) * gridDim.x);
  }
}

// Calls body(Gemm{}) with the GEMM policy of the operand dtype; `refused` for float64.
template <typename Result, typename Body>
Result with_gemm(DType operand, Result refused, Body&& body) {
  switch (operand) {
    case DType::kFloat32:
      return body(FmaGemm{});
    case DType::kFloat16:
      return body(TensorCoreGemm<__half>{});
    case DType::kBFloat16:
      return body(TensorCoreGemm<__nv_bfloat16>{});
    default:
      return refused;
  }
}

template <typename Gemm, typename Buffers>
cudaError_t launch_cooperative(void (*kernel)(PersistentLayer, PersistentPlan, Buffers), PersistentLayer layer,
                               PersistentPlan plan, Buffers buffers, cudaStream_t stream) {
  if (layer.steps == 0 || layer.batch == 0 || layer.hidden == 0) return cudaSuccess;
  if (plan.blocks < 1 || !Gemm::runs_with(plan.threads) || plan.blocks * plan.units_per_block < layer.hidden ||
      layer.barrier == nullptr || layer.w_hh == nullptr) {
    return cudaErrorInvalidValue;
  }
  const cudaError_t status = opt_in_shared_bytes(kernel, static_cast<size_t>(plan.shared_bytes));
  if (status != cudaSuccess) return status;
  void* arguments[] = {&layer, &plan, &buffers};
  return cudaLaunchCooperativeKernel(kernel, dim3(plan.blocks), dim3(plan.threads), arguments,
                                     static_cast<size_t>(plan.shared_bytes), stream);
}

// The kernel of the direction the buffers belong to.
template <RecurrentCell kCell, typename Gemm>
auto kernel_for(const PersistentForwardBuffers&) {
  return persistent_forward_kernel<kCell, Gemm>;
}
template <RecurrentCell kCell, typename Gemm>
auto kernel_for(const PersistentBackwardBuffers&) {
  return persistent_backward_kernel<kCell, Gemm>;
}

// The launch of one direction's kernel for the operand dtype's GEMM; the tensor cores
// also need their operand ping-pong buffer (h_operand forward, gate_operand backward).
template <RecurrentCell kCell, typename Buffers>
cudaError_t launch_layer(const PersistentLayer& layer, const PersistentPlan& plan, const Buffers& buffers,
                         const void* operand_buffer, cudaStream_t stream) {
  return with_gemm(layer.operand, cudaErrorInvalidValue, [&](auto gemm) -> cudaError_t {
    using Gemm = decltype(gemm);
    if (Gemm::kOperandBuffers && operand_buffer == nullptr) return cudaErrorInvalidValue;
    return launch_cooperative<Gemm>(kernel_for<kCell, Gemm>(buffers), layer, plan, buffers, stream);
  });
}

template <typename Gemm, typename Body>
cudaError_t with_kernel(RecurrentCell cell, bool backward, Body&& body) {
  if (backward) {
    return cell == RecurrentCell::kLstm ? body(persistent_backward_kernel<RecurrentCell::kLstm, Gemm>)
                                        : body(persistent_backward_kernel<RecurrentCell::kGru, Gemm>);
  }
  return cell == RecurrentCell::kLstm ? body(persistent_forward_kernel<RecurrentCell::kLstm, Gemm>)
                                      : body(persistent_forward_kernel<RecurrentCell::kGru, Gemm>);
}

}  // namespace

PersistentPlan persistent_recurrent_plan(RecurrentCell cell, bool backward, DType operand, int64_t batch,
                                         int64_t hidden, int multiprocessors, int64_t shared_bytes_per_block) {
  if (batch < 1 || hidden < 1 || multiprocessors < 1) return PersistentPlan{};
  return with_gemm(operand, PersistentPlan{}, [&](auto gemm) {
    using Gemm = decltype(gemm);
    PersistentPlan plan;
    const int64_t units = (hidden + multiprocessors - 1) / multiprocessors;
    const BlockGemmShape shape = block_gemm_shape<Gemm>(cell, backward, hidden, units);
    const int threads = Gemm::threads_for(batch, shape);
    const int64_t shared = shared_bytes_for<Gemm>(shape);
    if (threads == 0 || shared > shared_bytes_per_block) return plan;
    plan.blocks = static_cast<int>((hidden + units - 1) / units);
    plan.threads = threads;
    plan.units_per_block = units;
    plan.shared_bytes = shared;
    return plan;
  });
}

cudaError_t persistent_recurrent_plan_on_device(RecurrentCell cell, bool backward, DType operand, int64_t batch,
                                                int64_t hidden, PersistentPlan* plan) {
  *plan = PersistentPlan{};
  CooperativeDevice device;
  cudaError_t status = query_cooperative_device(&device);
  if (status != cudaSuccess || device.cooperative == 0) return status;
  if (operand == DType::kFloat16 || operand == DType::kBFloat16) {  // mma.sync m16n8k16: sm_80 and later
    int id = 0, major = 0;
    status = cudaGetDevice(&id);
    if (status == cudaSuccess) status = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, id);
    if (status != cudaSuccess || major < 8) return status;
  }
  const PersistentPlan candidate =
      persistent_recurrent_plan(cell, backward, operand, batch, hidden, device.multiprocessors, device.shared_optin);
  if (candidate.blocks == 0) return cudaSuccess;
  return with_gemm(operand, cudaErrorInvalidValue, [&](auto gemm) -> cudaError_t {
    return with_kernel<decltype(gemm)>(cell, backward, [&](auto kernel) -> cudaError_t {
      int per_multiprocessor = 0;
      const cudaError_t result =
          resident_blocks_per_multiprocessor(kernel, candidate.threads, candidate.shared_bytes, &per_multiprocessor);
      if (result == cudaSuccess &&
          static_cast<int64_t>(per_multiprocessor) * device.multiprocessors >= candidate.blocks) {
        *plan = candidate;
      }
      return result;
    });
  });
}

cudaError_t launch_persistent_lstm_forward(const PersistentLayer& layer, const PersistentPlan& plan,
                                           const PersistentForwardBuffers& buffers, cudaStream_t stream) {
  if (buffers.c_state == nullptr) return cudaErrorInvalidValue;
  return launch_layer<RecurrentCell::kLstm>(layer, plan, buffers, buffers.h_operand, stream);
}

cudaError_t launch_persistent_gru_forward(const PersistentLayer& layer, const PersistentPlan& plan,
                                          const PersistentForwardBuffers& buffers, cudaStream_t stream) {
  return launch_layer<RecurrentCell::kGru>(layer, plan, buffers, buffers.h_operand, stream);
}

cudaError_t launch_persistent_lstm_backward(const PersistentLayer& layer, const PersistentPlan& plan,
                                            const PersistentBackwardBuffers& buffers, cudaStream_t stream) {
  if (buffers.c0 == nullptr || buffers.grad_c == nullptr) return cudaErrorInvalidValue;
  return launch_layer<RecurrentCell::kLstm>(layer, plan, buffers, buffers.gate_operand, stream);
}

cudaError_t launch_persistent_gru_backward(const PersistentLayer& layer, const PersistentPlan& plan,
                                           const PersistentBackwardBuffers& buffers, cudaStream_t stream) {
  if (buffers.previous_h == nullptr || buffers.grad_input_gates == nullptr || buffers.direct == nullptr) {
    return cudaErrorInvalidValue;
  }
  return launch_layer<RecurrentCell::kGru>(layer, plan, buffers, buffers.gate_operand, stream);
}

}  // namespace cuda
}  // namespace fastattn
