// attention_tensor_core.cu: the multi-query forward and backward of the fused
// soft-attention op (attention_forward / attention_backward in csrc/ops.cpp) on the
// tensor cores, flash-attention-2 style: float16 / bfloat16 inputs, head dims D, Dv in
// {64, 128}, float accumulation (mma.cuh's m16n8k16 mma.sync).  The "dot", "cosine" and
// "additive" kernel scores, forward and backward.
//
// Forward: scores -> masks -> online softmax -> Gaussian -> P V for a tile of
// kBlockRows query rows per block (4 warps, 16 rows each) over tiles of kBlockKeys
// keys.  Dot: Q K^T on the tensor cores, times the scale (the Q fragments stay in
// registers).  Cosine: the same over 1 / max(|q|, floor) of each row (its group's 4
// lanes) and of each key (2 threads a key, per tile).  Additive: v . tanh(q + bias + k) on the FMA and special-function units
// (additive_tile_scores: each lane sums the pairs its score accumulators hold, 2 rows x
// 16 keys, so that one 16-byte key load serves 2 rows and one query load 16 keys; the
// tanh split 7:1 between tanh.approx and the rational tanh, additive_tanh), which is
// what bounds it; the softmax and P V as for dot.  Key and value tiles are staged in
// shared memory by cp.async, double
// buffered so that the next key tile's copies overlap this tile's MMAs (rows
// row-major, padded to keep ldmatrix 16-byte aligned and free of bank conflicts;
// ldmatrix.trans reads V's B fragments; tail tiles zero-filled, never read past the
// source).  Masks in-kernel as attention_forward.cu and csrc/cpu/attention.cpp
// define them (lengths, key_padding_mask, causal, local windows with the Gaussian
// factor): the block walks only the union of its rows' key ranges, so key tiles
// outside every row's range are never loaded.  Writes context and logsumexp (the
// backward's input, as launch_attention_forward does); a fully masked row gives zeros
// and -inf.
// Backward (recompute from logsumexp): row_dot = grad_context . context per row from
// the forward kernel run again in float (context not written; the 16-bit context the
// caller may hold lacks the precision: a rounded context swamps a peaked row's small
// score gradients); then one
// block per kBlockKeys keys walks the query tiles that see any of its keys (their Q
// and dO tiles double-buffered through cp.async like the forward's K and V), recomputes
// P^T and dP^T (4 warps, 16 keys each), accumulates grad_values = W^T dO and
// grad_keys = dS^T Q in registers (their sum as grad_keys with values_are_keys) and adds
// grad_query = dS K into a float scratch with atomics, converted to the input dtype at the
// end.  Cosine: the block's K tile and each
// Q tile are normalised in shared memory (r / max(|r|, floor), 2 threads a row) once they
// land, so the dot backward above gives the gradients of the unit vectors; grad_keys
// goes through k / max(|k|, floor) before it is written (the quad's lanes sum dk^.k),
// grad_query in finish_cosine_grad_query_kernel (a warp a row).  Additive: S^T from
// additive_tile_scores (keys as rows), dP^T, P^T dO as for dot; then, once dS is in
// shared memory, one more tanh per pair and feature gives the gradients of k (in
// registers), q (summed over the warp's keys, atomics into the float scratch), v
// (per thread, added to its float total at the end) and bias (the binding's sum of
// grad_query) together (additive_tile_gradients): 2 tanh per pair and feature in all,
// bound by the special-function unit as the forward is.
// Not handled (attention_tensor_core_supported says no; the binding keeps
// attention_forward.cu / attention_backward.cu): other scores and dtypes, other head
// dims, unaligned rows, the weights output and its gradient; the backward with the
// Gaussian factor (local windows): its row_dot came from the forward's weights p g
// rounded to T, so a peaked row's dS = alpha (g dP - row_dot) lost its cancellation at
// the most probable key wherever g there is not 1 (errors ~100x the 16-bit reference's
// under the CPU emulation; the per-row backward shifts its row term by that key's own
// term).  No warp specialisation, WGMMA or TMA (sm_80 instructions on sm_90a too).
#include "attention_device.cuh"
#include "mma.cuh"
#include "shared_memory_opt_in.h"

namespace fastattn {
namespace cuda {
namespace {

constexpr int kTensorCoreWarps = 4;
constexpr int kTensorCoreThreads = kTensorCoreWarps * kWarpSize;
constexpr int kWarpRows = 16;                                // the m of m16n8k16
constexpr int kBlockRows = kTensorCoreWarps * kWarpRows;     // query rows per block
constexpr int kBlockKeys = 64;                               // keys per tile
constexpr int kSkew = 8;                                     // padding per shared row (bank spread)
constexpr int kChunk = 8;                                    // elements per 16-byte load
static_assert(kTensorCoreThreads == 2 * kBlockKeys, "the cosine key norms take 2 threads a key");

// Floats the score needs in the forward's shared memory: v and bias (additive), the
// key tile's 1 / max(|k|, floor) (cosine).
template <ScoreKind kScore, int kD>
constexpr int score_floats() {
  return kScore == ScoreKind::kAdditive ? 2 * kD : kScore == ScoreKind::kCosine ? kBlockKeys : 0;
}

// Shared memory: row_begin, row_end (int64) | row_center (float) | key_hidden (int,
// two stages) | score_floats (float) | Q tile (kBlockRows x (kD + kSkew)) |
// two stages of a K tile (kBlockKeys x (kD + kSkew)) and a V tile (kBlockKeys x
// (kDv + kSkew)), all in T; every tile row 16-byte aligned.
template <ScoreKind kScore, int kD, int kDv>
constexpr size_t tensor_core_shared_bytes() {
  return 2 * sizeof(int64_t) * kBlockRows + sizeof(float) * kBlockRows + 2 * sizeof(int) * kBlockKeys +
         sizeof(float) * score_floats<kScore, kD>() +
         2 * (static_cast<size_t>(kBlockRows) * (kD + kSkew) +
              2 * static_cast<size_t>(kBlockKeys) * (kD + kSkew + kDv + kSkew));
}

// Starts copying `rows` rows of kWidth elements from `source` (row stride kWidth) into
// shared `tile` (row stride kWidth + kSkew) with cp.async; rows at or past
// `valid_rows` (at least 1) are zero-filled and read nothing (their source address is
// the first row's).  The caller commits and waits.
template <typename T, int kWidth>
__device__ __forceinline__ void copy_rows_async(T* tile, const T* source, int rows, int64_t valid_rows) {
  constexpr int kChunks = kWidth / kChunk;
  for (int i = threadIdx.x; i < rows * kChunks; i += kTensorCoreThreads) {
    const int r = i / kChunks, chunk = i % kChunks;
    const bool inside = r < valid_rows;
    copy_async_16(tile + r * (kWidth + kSkew) + chunk * kChunk,
                  source + (inside ? static_cast<int64_t>(r) * kWidth : 0) + chunk * kChunk, inside ? 16 : 0);
  }
}

// |row| of a kD-wide row in shared memory, by the 2 adjacent threads of a pair (part 0
// and 1: the even and the odd features), both of which get it.
template <typename T, int kD>
__device__ __forceinline__ float pair_row_norm(const T* row, int part) {
  float square_sum = 0.f;
  for (int d = part; d < kD; d += 2) square_sum += to_acc(row[d]) * to_acc(row[d]);
  return sqrtf(square_sum + __shfl_xor_sync(0xffffffffu, square_sum, 1));
}

// Waits until this thread's copies of the current stage have landed (the next stage's,
// when `next_in_flight`, may still be on their way), then until every thread's have:
// the current stage is readable by the whole block.
__device__ __forceinline__ void wait_for_current_stage(bool next_in_flight) {
  if (next_in_flight) {  // uniform
    wait_copies<1>();
  } else {
    wait_copies<0>();
  }
  __syncthreads();
}

// product[nt] (the 16 x 8 output tiles nt of one warp) += A B^T over kDepth: A the
// warp's 16 rows at `a` (row-major, stride a_stride), B kColumns rows at `b` (row-major,
// stride b_stride), both in shared memory.  Two 16-deep steps at a time: unrolled
// further, the compiler hoists every step's fragment loads and the backward's
// accumulators no longer fit in the registers.
template <typename T, int kDepth, int kColumns>
__device__ __forceinline__ void warp_rows_times_rows(float (&product)[kColumns / 8][4], const T* a, int a_stride,
                                                     const T* b, int b_stride) {
#pragma unroll 2
  for (int kk = 0; kk < kDepth / 16; ++kk) {
    uint32_t a_fragment[4];
    load_fragment_a(a_fragment, a + kk * 16, a_stride);
#pragma unroll
    for (int nt = 0; nt < kColumns / 8; nt += 2) {
      uint32_t b_fragments[2][2];
      load_fragments_b(b_fragments, b + nt * 8 * b_stride + kk * 16, b_stride);
      mma_m16n8k16<T>(product[nt], a_fragment, b_fragments[0]);
      mma_m16n8k16<T>(product[nt + 1], a_fragment, b_fragments[1]);
    }
  }
}

// product[dt] (the 16 x 8 output tiles dt of one warp) += A B for one 16-deep step: A
// the warp's fragment `a` (16 x 16), B the 16 rows at `b` (row-major, stride b_stride,
// kColumns wide) in shared memory.
template <typename T, int kColumns>
__device__ __forceinline__ void warp_fragment_times_rows(float (&product)[kColumns / 8][4], const uint32_t (&a)[4],
                                                         const T* b, int b_stride) {
#pragma unroll
  for (int dt = 0; dt < kColumns / 8; dt += 2) {
    uint32_t b_fragments[2][2];
    load_fragments_b_from_rows(b_fragments, b + dt * 8, b_stride);
    mma_m16n8k16<T>(product[dt], a, b_fragments[0]);
    mma_m16n8k16<T>(product[dt + 1], a, b_fragments[1]);
  }
}

// score[nt][r] += v . tanh(row + bias + column) over the kD features for the pairs of
// this lane's accumulators (rows group and group + 8 of the warp's 16 at `warp_rows`,
// columns 8 nt + 2 quad_lane + r % 2 of the kColumns at `columns`; both row-major with
// stride kStride in shared memory), v and bias floats in shared memory.  The forward
// passes query rows and key columns, the backward key rows and query columns.  Per 8
// features a lane loads its 2 rows once and each of its kColumns / 4 columns once, and
// takes kColumns / 2 x 8 tanh.
template <typename T, int kD, int kStride, int kColumns>
__device__ __forceinline__ void additive_tile_scores(float (&score)[kColumns / 8][4], const T* warp_rows,
                                                     const T* columns, const float* v, const float* bias) {
  const int lane = threadIdx.x % kWarpSize, group = lane / 4, quad_lane = lane % 4;
  const T* top = warp_rows + group * kStride;
#pragma unroll 1
  for (int d = 0; d < kD; d += kChunk) {
    float row[2][kChunk];
    load_pack<kChunk>(top + d, row[0]);
    load_pack<kChunk>(top + 8 * kStride + d, row[1]);
    const float* weight = v + d;
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      row[0][i] += bias[d + i];
      row[1][i] += bias[d + i];
    }
#pragma unroll
    for (int nt = 0; nt < kColumns / 8; ++nt) {
#pragma unroll
      for (int side = 0; side < 2; ++side) {
        float column[kChunk];
        load_pack<kChunk>(columns + (nt * 8 + 2 * quad_lane + side) * kStride + d, column);
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
          score[nt][side] += weight[i] * additive_tanh<T, kChunk>(row[0][i] + column[i], d, i);
          score[nt][2 + side] += weight[i] * additive_tanh<T, kChunk>(row[1][i] + column[i], d, i);
        }
      }
    }
  }
}

// The key range and window center of each query row first_row + r (r < kBlockRows)
// of batch n into shared arrays (empty ranges past the last row), by the first
// kBlockRows threads; the caller synchronises.
template <typename T>
__device__ __forceinline__ void load_row_ranges(const DeviceProblem<T>& p, int64_t n, int64_t first_row,
                                                int64_t* row_begin, int64_t* row_end, float* row_center) {
  if (threadIdx.x >= kBlockRows) return;
  const int64_t t = first_row + threadIdx.x;
  KeyRange range{0, 0};
  float center = 0.f;
  if (t < p.query_length) {
    range = p.keys_of(n, t);
    center = p.window_center(n, t);
  }
  row_begin[threadIdx.x] = range.begin;
  row_end[threadIdx.x] = range.end;
  row_center[threadIdx.x] = center;
}

// The forward; with row_dot not null it also writes row_dot[row] = grad_context[row] .
// context[row] (float, before rounding), and out.context / out.logsumexp may be null.
template <typename T, ScoreKind kScore, int kD, int kDv>
__global__ void __launch_bounds__(kTensorCoreThreads)
    attention_forward_tensor_core_kernel(DeviceProblem<T> p, AttentionForwardBuffers out, const T* grad_context,
                                         float* row_dot) {
  constexpr bool kAdditive = kScore == ScoreKind::kAdditive, kCosine = kScore == ScoreKind::kCosine;
  constexpr int kKeyStride = kD + kSkew, kValueStride = kDv + kSkew;
  constexpr int kStageElements = kBlockKeys * (kKeyStride + kValueStride);  // one K and one V tile
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  int64_t* row_begin = reinterpret_cast<int64_t*>(shared_bytes);
  int64_t* row_end = row_begin + kBlockRows;
  float* row_center = reinterpret_cast<float*>(row_end + kBlockRows);
  int* key_hidden_stages = reinterpret_cast<int*>(row_center + kBlockRows);
  float* additive_v = reinterpret_cast<float*>(key_hidden_stages + 2 * kBlockKeys);  // score_floats
  float* additive_bias = additive_v + kD;
  float* key_inverse_norm = additive_v;
  T* query_tile = reinterpret_cast<T*>(additive_v + score_floats<kScore, kD>());
  T* key_value_stages = query_tile + kBlockRows * kKeyStride;  // K tile, then V tile, per stage
  if constexpr (kAdditive) {  // read after the first work item's synchronisation
    for (int d = threadIdx.x; d < kD; d += kTensorCoreThreads) {
      additive_v[d] = to_acc(p.v[d]);
      additive_bias[d] = p.bias != nullptr ? to_acc(p.bias[d]) : 0.f;
    }
  }

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, group = lane / 4, column = lane % 4;
  const float minus_infinity = negative_infinity<float>();
  const int64_t row_tiles = (p.query_length + kBlockRows - 1) / kBlockRows;

  for (int64_t work = blockIdx.x; work < p.batch * row_tiles; work += gridDim.x) {
    const int64_t n = work / row_tiles, first_row = (work % row_tiles) * kBlockRows;
    const int64_t valid_rows = p.query_length - first_row;
    load_row_ranges(p, n, first_row, row_begin, row_end, row_center);
    copy_rows_async<T, kD>(query_tile, p.query_row(n * p.query_length + first_row), kBlockRows, valid_rows);
    commit_copies();
    __syncthreads();

    // The keys any row of the block sees: [lowest, highest).
    int64_t lowest = p.source_length, highest = 0;
    for (int r = 0; r < kBlockRows; ++r) {
      if (row_begin[r] >= row_end[r]) continue;
      lowest = row_begin[r] < lowest ? row_begin[r] : lowest;
      highest = row_end[r] > highest ? row_end[r] : highest;
    }
    // Starts loading the key tile at `tile` (K, V and which keys are hidden) into `stage`.
    auto start_key_tile = [&](int stage, int64_t tile) {
      const int64_t valid_keys = highest - tile;
      T* key_tile = key_value_stages + stage * kStageElements;
      copy_rows_async<T, kD>(key_tile, p.key_row(n, tile), kBlockKeys, valid_keys);
      copy_rows_async<T, kDv>(key_tile + kBlockKeys * kKeyStride, p.value_row(n, tile), kBlockKeys, valid_keys);
      if (threadIdx.x < kBlockKeys) {
        key_hidden_stages[stage * kBlockKeys + threadIdx.x] =
            threadIdx.x >= valid_keys || p.is_padding(n, tile + threadIdx.x);
      }
      commit_copies();
    };
    if (lowest < highest) start_key_tile(0, lowest);  // uniform
    wait_for_current_stage(lowest < highest);  // the Q tile; the first key tile may still be in flight

    // This lane's two rows (the accumulator rows group and group + 8 of its warp).
    const int top = warp * kWarpRows + group;
    const int64_t begin[2] = {row_begin[top], row_begin[top + 8]};
    const int64_t end[2] = {row_end[top], row_end[top + 8]};
    const float center[2] = {row_center[top], row_center[top + 8]};
    // Cosine: 1 / max(|q|, floor) of the two rows, the 4 lanes of the group a quarter of D each.
    float row_inverse_norm[2] = {1.f, 1.f};
    if constexpr (kCosine) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const T* query_row = query_tile + (top + 8 * half) * kKeyStride;
        float square_sum = 0.f;
        for (int d = column; d < kD; d += 4) square_sum += to_acc(query_row[d]) * to_acc(query_row[d]);
        square_sum += __shfl_xor_sync(0xffffffffu, square_sum, 1);
        square_sum += __shfl_xor_sync(0xffffffffu, square_sum, 2);
        row_inverse_norm[half] = 1.f / clamped_norm(sqrtf(square_sum), cosine_floor_of<T>());
      }
    }
    uint32_t query_fragment[kAdditive ? 1 : kD / 16][4];
    if constexpr (!kAdditive) {
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        load_fragment_a(query_fragment[kk], query_tile + warp * kWarpRows * kKeyStride + kk * 16, kKeyStride);
      }
    }
    OnlineSoftmax<float> softmax[2];  // the sums are this lane's share until the end
    float context[kDv / 8][4];
#pragma unroll
    for (int dt = 0; dt < kDv / 8; ++dt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) context[dt][r] = 0.f;
    }

    // Double-buffered key tiles: the next tile's copies run while this one's MMAs do.
    int stage = 0;
    for (int64_t tile = lowest; tile < highest; tile += kBlockKeys, stage ^= 1) {
      const bool next_in_flight = tile + kBlockKeys < highest;
      if (next_in_flight) start_key_tile(stage ^ 1, tile + kBlockKeys);
      wait_for_current_stage(next_in_flight);
      const T* key_tile = key_value_stages + stage * kStageElements;
      const T* value_tile = key_tile + kBlockKeys * kKeyStride;
      const int* key_hidden = key_hidden_stages + stage * kBlockKeys;
      if constexpr (kCosine) {  // 1 / max(|k|, floor) of the tile's keys, 2 threads a key
        const int key = threadIdx.x / 2, part = threadIdx.x % 2;
        const float norm = pair_row_norm<T, kD>(key_tile + key * kKeyStride, part);
        if (part == 0) key_inverse_norm[key] = 1.f / clamped_norm(norm, cosine_floor_of<T>());
        __syncthreads();
      }

      float score[kBlockKeys / 8][4];
#pragma unroll
      for (int nt = 0; nt < kBlockKeys / 8; ++nt) {
#pragma unroll
        for (int r = 0; r < 4; ++r) score[nt][r] = 0.f;
      }
      if constexpr (kAdditive) {
        additive_tile_scores<T, kD, kKeyStride, kBlockKeys>(score, query_tile + warp * kWarpRows * kKeyStride,
                                                            key_tile, additive_v, additive_bias);
      } else {
#pragma unroll
        for (int nt = 0; nt < kBlockKeys / 8; nt += 2) {
#pragma unroll
          for (int kk = 0; kk < kD / 16; ++kk) {
            uint32_t key_fragments[2][2];
            load_fragments_b(key_fragments, key_tile + nt * 8 * kKeyStride + kk * 16, kKeyStride);
            mma_m16n8k16<T>(score[nt], query_fragment[kk], key_fragments[0]);
            mma_m16n8k16<T>(score[nt + 1], query_fragment[kk], key_fragments[1]);
          }
        }
      }

      // Scale (dot, cosine with the norms) and mask; each row's maximum over the tile (the 4
      // lanes of a group share a row).
      float tile_max[2] = {minus_infinity, minus_infinity};
#pragma unroll
      for (int nt = 0; nt < kBlockKeys / 8; ++nt) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int half = r / 2, key = nt * 8 + 2 * column + r % 2;
          const int64_t j = tile + key;
          const bool visible = j >= begin[half] && j < end[half] && !key_hidden[key];
          float scaled = kAdditive ? score[nt][r] : score[nt][r] * p.scale;
          // One inverse norm at a time: their product overflows once |q| |k| < 3e-39.
          if (kCosine) scaled = scaled * row_inverse_norm[half] * key_inverse_norm[key];
          score[nt][r] = visible ? scaled : minus_infinity;
          tile_max[half] = score[nt][r] > tile_max[half] ? score[nt][r] : tile_max[half];
        }
      }
      float factor[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(0xffffffffu, tile_max[half], 1));
        tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(0xffffffffu, tile_max[half], 2));
        factor[half] = softmax[half].raise_max(tile_max[half]);
      }
#pragma unroll
      for (int dt = 0; dt < kDv / 8; ++dt) {
#pragma unroll
        for (int r = 0; r < 4; ++r) context[dt][r] *= factor[r / 2];
      }

      // P (times the Gaussian) as A fragments straight from the score accumulators,
      // then context += P V, 16 keys at a time.
#pragma unroll
      for (int kk = 0; kk < kBlockKeys / 16; ++kk) {
        float weight[2][4];
#pragma unroll
        for (int side = 0; side < 2; ++side) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int half = r / 2, nt = 2 * kk + side;
            const float s = score[nt][r];
            const float probability = s == minus_infinity ? 0.f : softmax[half].add(s);
            const int64_t j = tile + nt * 8 + 2 * column + r % 2;
            weight[side][r] = probability == 0.f ? 0.f : probability * p.gaussian_of(j, center[half]);
          }
        }
        const uint32_t probability_fragment[4] = {
            pack_pair<T>(weight[0][0], weight[0][1]), pack_pair<T>(weight[0][2], weight[0][3]),
            pack_pair<T>(weight[1][0], weight[1][1]), pack_pair<T>(weight[1][2], weight[1][3])};
        warp_fragment_times_rows<T, kDv>(context, probability_fragment, value_tile + kk * 16 * kValueStride,
                                         kValueStride);
      }
      __syncthreads();  // the tile after next overwrites this stage
    }

    // The row sums over the group's lanes, then context / sum and logsumexp.
    float inverse_sum[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      softmax[half].sum += __shfl_xor_sync(0xffffffffu, softmax[half].sum, 1);
      softmax[half].sum += __shfl_xor_sync(0xffffffffu, softmax[half].sum, 2);
      inverse_sum[half] = softmax[half].empty() ? 0.f : 1.f / softmax[half].sum;
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t t = first_row + top + 8 * half;
      if (t >= p.query_length) continue;
      const int64_t row = n * p.query_length + t;
      if (out.context != nullptr) {
        T* context_row = static_cast<T*>(out.context) + row * kDv;
#pragma unroll
        for (int dt = 0; dt < kDv / 8; ++dt) {
          *reinterpret_cast<uint32_t*>(context_row + dt * 8 + 2 * column) = pack_pair<T>(
              context[dt][2 * half] * inverse_sum[half], context[dt][2 * half + 1] * inverse_sum[half]);
        }
      }
      if (out.logsumexp != nullptr && column == 0) static_cast<float*>(out.logsumexp)[row] = softmax[half].logsumexp();
    }
    if (row_dot != nullptr) {  // every lane of a group takes part in the shuffles
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t t = first_row + top + 8 * half;
        float sum = 0.f;
        if (t < p.query_length) {
          const T* grad_row = grad_context + (n * p.query_length + t) * kDv;
#pragma unroll
          for (int dt = 0; dt < kDv / 8; ++dt) {
            sum += context[dt][2 * half] * to_acc(grad_row[dt * 8 + 2 * column]) +
                   context[dt][2 * half + 1] * to_acc(grad_row[dt * 8 + 2 * column + 1]);
          }
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        if (t < p.query_length && column == 0) row_dot[n * p.query_length + t] = sum * inverse_sum[half];
      }
    }
    __syncthreads();  // the next work item overwrites the row arrays and the Q tile
  }
}

// Shared memory of the backward: row_begin, row_end (int64) | row_center,
// row_logsumexp, row_dot (float), each two stages of kBlockRows | key_hidden (int) |
// key_norm (float, |k| of the tile's keys: cosine) | v and bias (float, kD each:
// additive) | K tile, V tile (kBlockKeys rows) | two stages of a Q tile and a
// grad_context tile (kBlockRows rows each; the dS tile, kBlockRows x kBlockKeys,
// replaces the stage's grad_context tile once it is used, so that a 128-dim block
// stays under half an SM's shared memory), in T.
template <ScoreKind kScore, int kD, int kDv>
constexpr size_t backward_shared_bytes() {
  return 2 * (2 * sizeof(int64_t) + 3 * sizeof(float)) * kBlockRows + (sizeof(int) + sizeof(float)) * kBlockKeys +
         sizeof(float) * (kScore == ScoreKind::kAdditive ? 2 * kD : 0) +
         2 * static_cast<size_t>(kBlockKeys + 2 * kBlockRows) * (kD + kSkew + kDv + kSkew);
}

// Cosine backward: the kBlockRows (= kBlockKeys) rows of `tile` (kD wide, row stride
// kStride) in place as r / max(|r|, floor), 2 threads a row (the forward's key-norm
// split); `norms` (when given) gets each |r|.  The caller synchronises before and after.
template <typename T, int kD, int kStride>
__device__ __forceinline__ void normalize_tile_rows(T* tile, float* norms) {
  static_assert(kTensorCoreThreads == 2 * kBlockRows && kBlockRows == kBlockKeys, "2 threads a row");
  const int row = threadIdx.x / 2, part = threadIdx.x % 2;
  T* values = tile + row * kStride;
  const float norm = pair_row_norm<T, kD>(values, part), inverse_norm = 1.f / clamped_norm(norm, cosine_floor_of<T>());
  for (int d = part; d < kD; d += 2) values[d] = from_acc<T>(to_acc(values[d]) * inverse_norm);
  if (norms != nullptr && part == 0) norms[row] = norm;
}

// C-layout accumulators of two adjacent 16 x 8 tiles (columns 16 kk .. 16 kk + 15) as
// the A fragment of the next product (the flash-attention register reuse).
template <typename T>
__device__ __forceinline__ void accumulators_as_a(uint32_t (&a)[4], const float (&left)[4], const float (&right)[4]) {
  a[0] = pack_pair<T>(left[0], left[1]);
  a[1] = pack_pair<T>(left[2], left[3]);
  a[2] = pack_pair<T>(right[0], right[1]);
  a[3] = pack_pair<T>(right[2], right[3]);
}

// The additive backward's lanes in its gradient pass: each takes kChunk features
// (feature lane = lane % kFeatureLanes) of kKeys of its warp's kWarpRows keys (m
// kKeyLanes + lane / kFeatureLanes), so that every lane takes the same feature
// positions of a chunk (the tanh of each on the same unit, additive_tanh) and a query's
// gradient needs a sum over kKeyLanes lanes only.
template <int kD>
struct AdditiveLanes {
  static constexpr int kFeatureLanes = kD / kChunk;
  static constexpr int kKeyLanes = kWarpSize / kFeatureLanes;
  static constexpr int kKeys = kWarpRows / kKeyLanes;
  static_assert(kFeatureLanes * kKeyLanes == kWarpSize && kKeys * kKeyLanes == kWarpRows, "head dims 64 and 128");
};

// The additive backward's gradient pass over one query tile, for the warp's keys at
// `warp_keys` (row-major, stride kKeyStride) and the `rows` first query rows of
// `query_tile` (same stride), with dS at `score_grad` ([query][key of the warp], stride
// kScoreStride, in T): for each pair of nonzero dS and each feature, u = tanh(q + bias +
// k) (again: the score pass's sums did not keep them) and t = dS v (1 - u^2);
// key_grad[m] += t, grad_v += dS u, and grad_query += t summed over the warp's keys,
// added with atomics to the float rows at grad_query_rows (stride kD).  v and bias:
// the score's, floats in shared memory (read for each query, so that they hold no
// registers through the kernel).
template <typename T, int kD, int kKeyStride, int kScoreStride>
__device__ __forceinline__ void additive_tile_gradients(float (&key_grad)[AdditiveLanes<kD>::kKeys][kChunk],
                                                        float (&v_grad)[kChunk], const T* query_tile, int rows,
                                                        const T* warp_keys, const T* score_grad,
                                                        const float* v_all, const float* bias_all,
                                                        float* grad_query_rows) {
  using Lanes = AdditiveLanes<kD>;
  const int lane = threadIdx.x % kWarpSize, feature = (lane % Lanes::kFeatureLanes) * kChunk;
  const int key_lane = lane / Lanes::kFeatureLanes;
#pragma unroll 1
  for (int q = 0; q < rows; ++q) {
    float query[kChunk], v[kChunk], query_grad[kChunk] = {};
    load_pack<kChunk>(query_tile + q * kKeyStride + feature, query);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      query[i] += bias_all[feature + i];
      v[i] = v_all[feature + i];
    }
#pragma unroll
    for (int m = 0; m < Lanes::kKeys; ++m) {
      const int key = m * Lanes::kKeyLanes + key_lane;
      const float pair_grad = to_acc(score_grad[q * kScoreStride + key]);
      if (pair_grad == 0.f) continue;  // masked pairs add nothing, whatever their rows hold
      float k[kChunk];
      load_pack<kChunk>(warp_keys + key * kKeyStride + feature, k);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const float u = additive_tanh<T, kChunk>(query[i] + k[i], feature, i);
        const float term = pair_grad * v[i] * tanh_derivative(u);
        key_grad[m][i] += term;
        query_grad[i] += term;
        v_grad[i] += pair_grad * u;
      }
    }
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
#pragma unroll
      for (int offset = Lanes::kFeatureLanes; offset < kWarpSize; offset *= 2) {
        query_grad[i] += __shfl_xor_sync(0xffffffffu, query_grad[i], offset);
      }
    }
    if (key_lane == 0) {
#pragma unroll
      for (int i = 0; i < kChunk; ++i) atomicAdd(grad_query_rows + q * kD + feature + i, query_grad[i]);
    }
  }
}

// The dot backward's grad_query rows += dS K for this warp's 16 queries of the tile,
// 16 features at a time: dS the tile's [query][key] in shared memory (stride
// kScoreStride), K the block's key tile (stride kKeyStride), added with atomics to the
// float rows at grad_query_rows (stride kD) that are among the `rows` first.
template <typename T, int kD, int kKeyStride, int kScoreStride>
__device__ __forceinline__ void add_score_grad_times_keys(const T* score_grad_tile, const T* key_tile, int rows,
                                                          float* grad_query_rows) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, group = lane / 4, column = lane % 4;
  const int query_top = warp * kWarpRows + group;
  uint32_t score_grad_fragments[kBlockKeys / 16][4];
#pragma unroll
  for (int kk = 0; kk < kBlockKeys / 16; ++kk) {
    load_fragment_a(score_grad_fragments[kk], score_grad_tile + warp * kWarpRows * kScoreStride + kk * 16,
                    kScoreStride);
  }
#pragma unroll 2  // fully unrolled, the hoisted key fragment loads spill the accumulators
  for (int dt = 0; dt < kD / 8; dt += 2) {
    float query_grad[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < kBlockKeys / 16; ++kk) {
      uint32_t key_fragments[2][2];
      load_fragments_b_from_rows(key_fragments, key_tile + kk * 16 * kKeyStride + dt * 8, kKeyStride);
      mma_m16n8k16<T>(query_grad[0], score_grad_fragments[kk], key_fragments[0]);
      mma_m16n8k16<T>(query_grad[1], score_grad_fragments[kk], key_fragments[1]);
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int query = query_top + 8 * (r / 2);
      if (query < rows) {
        float* grad_row = grad_query_rows + query * kD + dt * 8 + 2 * column + r % 2;
        atomicAdd(grad_row, query_grad[0][r]);
        atomicAdd(grad_row + 8, query_grad[1][r]);
      }
    }
  }
}

template <typename T, ScoreKind kScore, int kD, int kDv>
__global__ void __launch_bounds__(kTensorCoreThreads)
    attention_backward_tensor_core_kernel(DeviceProblem<T> p, AttentionBackwardBuffers b,
                                          float* grad_query_accumulator) {
  constexpr bool kCosine = kScore == ScoreKind::kCosine, kAdditive = kScore == ScoreKind::kAdditive;
  using Lanes = AdditiveLanes<kD>;
  constexpr int kKeyStride = kD + kSkew, kValueStride = kDv + kSkew, kScoreStride = kBlockKeys + kSkew;
  static_assert(kScoreStride <= kValueStride, "the dS tile takes the place of a dO tile");
  constexpr int kStageElements = kBlockRows * (kKeyStride + kValueStride);  // one Q and one dO tile
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  int64_t* row_begin_stages = reinterpret_cast<int64_t*>(shared_bytes);
  int64_t* row_end_stages = row_begin_stages + 2 * kBlockRows;
  float* row_center_stages = reinterpret_cast<float*>(row_end_stages + 2 * kBlockRows);
  float* row_logsumexp_stages = row_center_stages + 2 * kBlockRows;
  float* row_dot_stages = row_logsumexp_stages + 2 * kBlockRows;
  int* key_hidden = reinterpret_cast<int*>(row_dot_stages + 2 * kBlockRows);
  float* key_norm = reinterpret_cast<float*>(key_hidden + kBlockKeys);
  float* additive_v = key_norm + kBlockKeys;  // additive: v, then bias
  float* additive_bias = additive_v + kD;
  T* key_tile = reinterpret_cast<T*>(additive_v + (kAdditive ? 2 * kD : 0));
  T* value_tile = key_tile + kBlockKeys * kKeyStride;
  T* query_grad_stages = value_tile + kBlockKeys * kValueStride;  // Q tile, then dO tile, per stage

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, group = lane / 4, column = lane % 4;
  const int64_t key_tiles = (p.source_length + kBlockKeys - 1) / kBlockKeys;
  const T* grad_context = static_cast<const T*>(b.grad_context);
  const float* logsumexp = static_cast<const float*>(b.logsumexp);
  const float* row_dot_in = static_cast<const float*>(b.row_dot);
  // Additive: the score's scale is 1; v and bias in shared memory (read after the first
  // work item's synchronisation); this thread's share of grad_v over its work items.
  const float score_scale = kAdditive ? 1.f : p.scale;
  float v_grad[kChunk] = {};
  if constexpr (kAdditive) {
    for (int d = threadIdx.x; d < kD; d += kTensorCoreThreads) {
      additive_v[d] = to_acc(p.v[d]);
      additive_bias[d] = p.bias != nullptr ? to_acc(p.bias[d]) : 0.f;
    }
  }

  for (int64_t work = blockIdx.x; work < p.batch * key_tiles; work += gridDim.x) {
    const int64_t n = work / key_tiles, first_key = (work % key_tiles) * kBlockKeys;
    const int64_t valid_keys = p.source_length - first_key;
    copy_rows_async<T, kD>(key_tile, p.key_row(n, first_key), kBlockKeys, valid_keys);
    copy_rows_async<T, kDv>(value_tile, p.value_row(n, first_key), kBlockKeys, valid_keys);
    commit_copies();
    if (threadIdx.x < kBlockKeys) {
      key_hidden[threadIdx.x] = threadIdx.x >= valid_keys || p.is_padding(n, first_key + threadIdx.x);
    }
    if constexpr (kCosine) {  // K becomes K^ before any query tile is copied
      wait_copies<0>();
      __syncthreads();
      normalize_tile_rows<T, kD, kKeyStride>(key_tile, key_norm);
      __syncthreads();
    }
    // This lane's keys: local key_top and key_top + 8 (the accumulator rows of its warp);
    // additive: the keys and features of AdditiveLanes for grad_keys.
    const int key_top = warp * kWarpRows + group;
    float key_grad[kAdditive ? 1 : kD / 8][4] = {}, additive_key_grad[kAdditive ? Lanes::kKeys : 1][kChunk] = {};
    float value_grad[kDv / 8][4];
#pragma unroll
    for (int dt = 0; dt < kDv / 8; ++dt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) value_grad[dt][r] = 0.f;
    }

    // Finds the first query tile at or after `from` with a row that sees a key of this
    // block, leaves its row arrays in `stage` and starts copying its Q and dO tiles
    // there; returns its first row (query_length when there is none).
    auto start_query_tile = [&](int64_t from, int stage) -> int64_t {
      int64_t* row_begin = row_begin_stages + stage * kBlockRows;
      int64_t* row_end = row_end_stages + stage * kBlockRows;
      for (int64_t first_row = from; first_row < p.query_length; first_row += kBlockRows) {
        load_row_ranges(p, n, first_row, row_begin, row_end, row_center_stages + stage * kBlockRows);
        __syncthreads();
        bool touches = false;
        for (int r = 0; r < kBlockRows; ++r) {
          touches = touches || (row_begin[r] < row_end[r] && row_begin[r] < first_key + kBlockKeys &&
                                row_end[r] > first_key);
        }
        if (!touches) {  // uniform: every thread read the same arrays
          __syncthreads();  // before the next tile's ranges overwrite them
          continue;
        }
        if (threadIdx.x < kBlockRows) {
          const int64_t t = first_row + threadIdx.x;
          const bool valid = t < p.query_length;
          row_logsumexp_stages[stage * kBlockRows + threadIdx.x] =
              valid ? logsumexp[n * p.query_length + t] : negative_infinity<float>();
          row_dot_stages[stage * kBlockRows + threadIdx.x] = valid ? row_dot_in[n * p.query_length + t] : 0.f;
        }
        const int64_t valid_rows = p.query_length - first_row;
        T* query_tile = query_grad_stages + stage * kStageElements;
        copy_rows_async<T, kD>(query_tile, p.query_row(n * p.query_length + first_row), kBlockRows, valid_rows);
        copy_rows_async<T, kDv>(query_tile + kBlockRows * kKeyStride,
                                grad_context + (n * p.query_length + first_row) * kDv, kBlockRows, valid_rows);
        commit_copies();
        return first_row;
      }
      return p.query_length;
    };

    // Double-buffered query tiles: the next tile's copies run while this one's MMAs do.
    int stage = 0;
    int64_t first_row = start_query_tile(0, stage);
    while (first_row < p.query_length) {
      const int64_t next_row = start_query_tile(first_row + kBlockRows, stage ^ 1);
      wait_for_current_stage(next_row < p.query_length);
      if constexpr (kCosine) {  // Q becomes Q^
        normalize_tile_rows<T, kD, kKeyStride>(query_grad_stages + stage * kStageElements, nullptr);
        __syncthreads();
      }
      const int64_t* row_begin = row_begin_stages + stage * kBlockRows;
      const int64_t* row_end = row_end_stages + stage * kBlockRows;
      const float* row_logsumexp = row_logsumexp_stages + stage * kBlockRows;
      const float* row_dot = row_dot_stages + stage * kBlockRows;
      const T* query_tile = query_grad_stages + stage * kStageElements;
      const T* grad_tile = query_tile + kBlockRows * kKeyStride;
      T* score_grad_tile = query_grad_stages + stage * kStageElements + kBlockRows * kKeyStride;  // dS, once dO is used

      // For each half of the tile's queries (32 at a time, so that the half's S^T and dP^T
      // accumulators, not the whole tile's, live beside grad_keys and grad_values):
      // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys, then alpha =
      // exp(e - logsumexp) on visible pairs and scale * dS =
      // scale * alpha (dP - row_dot), then grad_values += P^T dO and grad_keys +=
      // dS^T Q, 16 queries at a time.  dS stays packed in T (the A fragments) until
      // every warp is done with the dO tile it replaces.
      constexpr int kHalfRows = kBlockRows / 2;
      uint32_t transposed_score_grad[kBlockRows / 16][4];  // dS^T, A fragments of 16 queries each
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int first_query = half * kHalfRows;
        float score[kHalfRows / 8][4], probability_grad[kHalfRows / 8][4];
#pragma unroll
        for (int nt = 0; nt < kHalfRows / 8; ++nt) {
#pragma unroll
          for (int r = 0; r < 4; ++r) score[nt][r] = probability_grad[nt][r] = 0.f;
        }
        if constexpr (kAdditive) {
          additive_tile_scores<T, kD, kKeyStride, kHalfRows>(score, key_tile + warp * kWarpRows * kKeyStride,
                                                             query_tile + first_query * kKeyStride, additive_v,
                                                             additive_bias);
        } else {
          warp_rows_times_rows<T, kD, kHalfRows>(score, key_tile + warp * kWarpRows * kKeyStride, kKeyStride,
                                                 query_tile + first_query * kKeyStride, kKeyStride);
        }
        warp_rows_times_rows<T, kDv, kHalfRows>(probability_grad, value_tile + warp * kWarpRows * kValueStride,
                                                kValueStride, grad_tile + first_query * kValueStride, kValueStride);
#pragma unroll
        for (int nt = 0; nt < kHalfRows / 8; ++nt) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int key = key_top + 8 * (r / 2), query = first_query + nt * 8 + 2 * column + r % 2;
            const int64_t j = first_key + key;
            const bool visible = !key_hidden[key] && j >= row_begin[query] && j < row_end[query];
            const float alpha = visible ? exp_of(score[nt][r] * score_scale - row_logsumexp[query]) : 0.f;
            const float score_grad = score_scale * softmax_score_gradient(alpha, probability_grad[nt][r],
                                                                          row_dot[query]);
            probability_grad[nt][r] = alpha;  // now the weight
            score[nt][r] = score_grad;
          }
        }
#pragma unroll
        for (int kk = 0; kk < kHalfRows / 16; ++kk) {
          uint32_t weight_fragment[4];
          uint32_t(&score_grad_fragment)[4] = transposed_score_grad[half * (kHalfRows / 16) + kk];
          accumulators_as_a<T>(weight_fragment, probability_grad[2 * kk], probability_grad[2 * kk + 1]);
          accumulators_as_a<T>(score_grad_fragment, score[2 * kk], score[2 * kk + 1]);
          const int row = first_query + kk * 16;
          warp_fragment_times_rows<T, kDv>(value_grad, weight_fragment, grad_tile + row * kValueStride, kValueStride);
          if constexpr (!kAdditive) {
            warp_fragment_times_rows<T, kD>(key_grad, score_grad_fragment, query_tile + row * kKeyStride, kKeyStride);
          }
        }
      }
      __syncthreads();  // every warp is done with this stage's Q and dO tiles

      // dS ([query][key]) over this stage's dO tile, the A operand of grad_query = dS K:
      // fragment register 2 side + r / 2 of queries 16 f + 8 side holds (key key_top +
      // 8 (r / 2), query 2 column + r % 2) in its low (r even) or high half.
      unsigned short* score_grad_bits = reinterpret_cast<unsigned short*>(score_grad_tile);
#pragma unroll
      for (int f = 0; f < kBlockRows / 16; ++f) {
#pragma unroll
        for (int side = 0; side < 2; ++side) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int key = key_top + 8 * (r / 2), query = f * 16 + side * 8 + 2 * column + r % 2;
            const uint32_t pair = transposed_score_grad[f][2 * side + r / 2];
            score_grad_bits[query * kScoreStride + key] = static_cast<unsigned short>(r % 2 == 0 ? pair : pair >> 16);
          }
        }
      }
      __syncthreads();  // the dS tile is complete

      const int rows = p.query_length - first_row < kBlockRows ? static_cast<int>(p.query_length - first_row)
                                                                : kBlockRows;  // of the tile's
      if constexpr (kAdditive) {
        additive_tile_gradients<T, kD, kKeyStride, kScoreStride>(
            additive_key_grad, v_grad, query_tile, rows, key_tile + warp * kWarpRows * kKeyStride,
            score_grad_tile + warp * kWarpRows, additive_v, additive_bias,
            grad_query_accumulator + (n * p.query_length + first_row) * kD);
      } else {
        add_score_grad_times_keys<T, kD, kKeyStride, kScoreStride>(
            score_grad_tile, key_tile, rows, grad_query_accumulator + (n * p.query_length + first_row) * kD);
      }
      __syncthreads();  // the query tile after next overwrites this stage, dS included
      first_row = next_row;
      stage ^= 1;
    }
    wait_copies<0>();  // K and V, when no query tile sees this block's keys

    // Cosine: grad_keys so far is the gradient of k^ = k / max(|k|, floor); through it,
    // from dk^.k (the quad's 4 lanes hold a key row's columns).
    if constexpr (kCosine) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t j = first_key + key_top + 8 * half;
        const T* key = p.key_row(n, j < p.source_length ? j : 0);
        float grad_dot_key = 0.f;
#pragma unroll
        for (int dt = 0; dt < kD / 8; ++dt) {
          const int d = dt * 8 + 2 * column;
          grad_dot_key += key_grad[dt][2 * half] * to_acc(key[d]) + key_grad[dt][2 * half + 1] * to_acc(key[d + 1]);
        }
        grad_dot_key += __shfl_xor_sync(0xffffffffu, grad_dot_key, 1);
        grad_dot_key += __shfl_xor_sync(0xffffffffu, grad_dot_key, 2);
        const auto gradient = unit_vector_gradient(key_norm[key_top + 8 * half], grad_dot_key, cosine_floor_of<T>());
#pragma unroll
        for (int dt = 0; dt < kD / 8; ++dt) {
          const int d = dt * 8 + 2 * column;
          key_grad[dt][2 * half] = gradient.of(key_grad[dt][2 * half], to_acc(key[d]));
          key_grad[dt][2 * half + 1] = gradient.of(key_grad[dt][2 * half + 1], to_acc(key[d + 1]));
        }
      }
    }

    // Every key of the tile gets its gradients (zeros for keys no query sees).  Values that
    // are the keys (kD == kDv, the fragments' layouts one): the value term goes to
    // grad_keys, added to the key term in registers (dot, cosine) or written first and
    // added to by the additive key term below (its lanes hold other features).
    const bool values_are_keys = kD == kDv && b.values_are_keys;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t j = first_key + key_top + 8 * half;
      if (j >= p.source_length) continue;
      T* key_row = static_cast<T*>(b.grad_keys) + (n * p.source_length + j) * kD;
      T* value_row = values_are_keys ? key_row : static_cast<T*>(b.grad_values) + (n * p.source_length + j) * kDv;
      if constexpr (!kAdditive) {
#pragma unroll
        for (int dt = 0; dt < kD / 8; ++dt) {
          float first = key_grad[dt][2 * half], second = key_grad[dt][2 * half + 1];
          if (values_are_keys) {
            first += value_grad[dt][2 * half];
            second += value_grad[dt][2 * half + 1];
          }
          *reinterpret_cast<uint32_t*>(key_row + dt * 8 + 2 * column) = pack_pair<T>(first, second);
        }
        if (values_are_keys) continue;
      }
#pragma unroll
      for (int dt = 0; dt < kDv / 8; ++dt) {
        *reinterpret_cast<uint32_t*>(value_row + dt * 8 + 2 * column) =
            pack_pair<T>(value_grad[dt][2 * half], value_grad[dt][2 * half + 1]);
      }
    }
    if constexpr (kAdditive) {  // the lane's keys and features of AdditiveLanes
      if (values_are_keys) __syncthreads();  // the value terms written above, by other lanes (uniform branch)
      const int feature = (lane % Lanes::kFeatureLanes) * kChunk, key_lane = lane / Lanes::kFeatureLanes;
#pragma unroll
      for (int m = 0; m < Lanes::kKeys; ++m) {
        const int64_t j = first_key + warp * kWarpRows + m * Lanes::kKeyLanes + key_lane;
        if (j < p.source_length) {
          T* key_row = static_cast<T*>(b.grad_keys) + (n * p.source_length + j) * kD + feature;
          if (values_are_keys) {
            float value_term[kChunk];
            load_pack<kChunk>(key_row, value_term);
#pragma unroll
            for (int i = 0; i < kChunk; ++i) value_term[i] += additive_key_grad[m][i];
            store_pack<kChunk>(key_row, value_term);
          } else {
            store_pack<kChunk>(key_row, additive_key_grad[m]);
          }
        }
      }
    }
    __syncthreads();  // the next work item overwrites K, V and key_hidden
  }
  // Additive: grad_v, this thread's share over all its work items, summed over the
  // warp's key lanes and added to the float total (zeroed by the launch).
  if constexpr (kAdditive) {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
#pragma unroll
      for (int offset = Lanes::kFeatureLanes; offset < kWarpSize; offset *= 2) {
        v_grad[i] += __shfl_xor_sync(0xffffffffu, v_grad[i], offset);
      }
    }
    if (lane < Lanes::kFeatureLanes) {
#pragma unroll
      for (int i = 0; i < kChunk; ++i) atomicAdd(static_cast<float*>(b.grad_v_rows) + lane * kChunk + i, v_grad[i]);
    }
  }
}

// grad_query = the float accumulator in T.
template <typename T>
__global__ void convert_grad_query_kernel(const float* accumulator, T* grad_query, int64_t total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    grad_query[i] = from_acc<T>(accumulator[i]);
  }
}

// Cosine: grad_query = the float accumulator (the gradient of q^ = q / max(|q|, floor))
// through q^, in T; a warp a row, kD / 32 columns a lane.
template <typename T, int kD>
__global__ void finish_cosine_grad_query_kernel(DeviceProblem<T> p, const float* accumulator, T* grad_query) {
  constexpr int kPerLane = kD / kWarpSize;
  const int lane = threadIdx.x % kWarpSize, warps = blockDim.x / kWarpSize;
  const int64_t rows = p.batch * p.query_length;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / kWarpSize; row < rows;
       row += static_cast<int64_t>(gridDim.x) * warps) {  // uniform per warp
    const T* query = p.query_row(row);
    float q[kPerLane], grad[kPerLane], square_sum = 0.f, grad_dot_query = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      q[i] = to_acc(query[lane + i * kWarpSize]);
      grad[i] = accumulator[row * kD + lane + i * kWarpSize];
      square_sum += q[i] * q[i];
      grad_dot_query += grad[i] * q[i];
    }
    const auto gradient = unit_vector_gradient(sqrtf(warp_sum(square_sum)), warp_sum(grad_dot_query), cosine_floor_of<T>());
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      grad_query[row * kD + lane + i * kWarpSize] = from_acc<T>(gradient.of(grad[i], q[i]));
    }
  }
}

// The forward kernel on every (batch, query tile); see its row_dot mode.
template <typename T, ScoreKind kScore, int kD, int kDv>
cudaError_t launch_forward(const AttentionProblem& p, const AttentionForwardBuffers& out, const void* grad_context,
                           void* row_dot, cudaStream_t stream) {
  constexpr size_t shared = tensor_core_shared_bytes<kScore, kD, kDv>();
  static_assert(shared % 16 == 0, "whole 16-byte vectors of shared memory (whole_shared_vectors)");
  auto kernel = attention_forward_tensor_core_kernel<T, kScore, kD, kDv>;
  const cudaError_t status = opt_in_shared_bytes(kernel, shared);
  if (status != cudaSuccess) return status;
  const int64_t work = p.batch * ((p.query_length + kBlockRows - 1) / kBlockRows);
  kernel<<<grid_for(work), kTensorCoreThreads, shared, stream>>>(
      device_problem<T>(p), out, static_cast<const T*>(grad_context), static_cast<float*>(row_dot));
  return cudaGetLastError();
}

template <typename T, ScoreKind kScore, int kD, int kDv>
cudaError_t launch_backward(const AttentionProblem& p, const AttentionBackwardBuffers& b,
                            float* grad_query_accumulator, cudaStream_t stream) {
  const int64_t rows = p.batch * p.query_length;
  cudaError_t status = cudaSuccess;
  if (rows > 0) {
    status = launch_forward<T, kScore, kD, kDv>(p, AttentionForwardBuffers{nullptr, nullptr}, b.grad_context,
                                                b.row_dot, stream);
    if (status != cudaSuccess) return status;
    status = cudaMemsetAsync(grad_query_accumulator, 0, sizeof(float) * static_cast<size_t>(rows * kD), stream);
    if (status != cudaSuccess) return status;
  }
  if constexpr (kScore == ScoreKind::kAdditive) {  // grad_v: the total of every block's share
    status = cudaMemsetAsync(b.grad_v_rows, 0, sizeof(float) * kD, stream);
    if (status != cudaSuccess) return status;
  }
  const int64_t key_tiles = (p.source_length + kBlockKeys - 1) / kBlockKeys;
  if (p.batch * key_tiles > 0) {
    constexpr size_t shared = backward_shared_bytes<kScore, kD, kDv>();
    static_assert(shared % 16 == 0, "whole 16-byte vectors of shared memory (whole_shared_vectors)");
    auto kernel = attention_backward_tensor_core_kernel<T, kScore, kD, kDv>;
    status = opt_in_shared_bytes(kernel, shared);
    if (status != cudaSuccess) return status;
    kernel<<<grid_for(p.batch * key_tiles), kTensorCoreThreads, shared, stream>>>(device_problem<T>(p), b,
                                                                                 grad_query_accumulator);
    status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  if (rows > 0) {
    if constexpr (kScore == ScoreKind::kCosine) {
      const int64_t blocks = (rows + 7) / 8;  // 8 warps, a row each
      finish_cosine_grad_query_kernel<T, kD><<<grid_for(blocks < 65536 ? blocks : 65536), 256, 0, stream>>>(
          device_problem<T>(p), grad_query_accumulator, static_cast<T*>(b.grad_query));
    } else {
      const int64_t total = rows * kD, blocks = (total + 255) / 256;
      convert_grad_query_kernel<T><<<grid_for(blocks < 65536 ? blocks : 65536), 256, 0, stream>>>(
          grad_query_accumulator, static_cast<T*>(b.grad_query), total);
    }
    status = cudaGetLastError();
  }
  return status;
}

template <int kValue>
struct HeadDim {
  static constexpr int value = kValue;
};

// body(T{}, HeadDim<D>{}, HeadDim<Dv>{}) for the problem's dtype and head dims.
template <typename Body>
cudaError_t dispatch_tensor_core(const AttentionProblem& p, Body&& body) {
  auto for_type = [&](auto element) -> cudaError_t {
    auto for_value_dim = [&](auto dim) -> cudaError_t {
      if (p.value_dim == 64) return body(element, dim, HeadDim<64>{});
      return body(element, dim, HeadDim<128>{});
    };
    if (p.score_dim == 64) return for_value_dim(HeadDim<64>{});
    return for_value_dim(HeadDim<128>{});
  };
  if (p.dtype == DType::kFloat16) return for_type(__half{});
  return for_type(__nv_bfloat16{});
}

bool head_dim_supported(int64_t dim) { return dim == 64 || dim == 128; }
bool aligned_to_16_bytes(const void* pointer) { return (reinterpret_cast<uintptr_t>(pointer) & 15u) == 0; }

}  // namespace

bool attention_tensor_core_supported(const AttentionProblem& p, int compute_capability_major) {
  const bool half_precision = p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16;
  const bool score = p.score == ScoreKind::kDot || p.score == ScoreKind::kCosine ||
                     (p.score == ScoreKind::kAdditive && p.v != nullptr);
  return compute_capability_major >= 8 && half_precision && score && head_dim_supported(p.score_dim) && head_dim_supported(p.value_dim) && p.keys_batch_stride % kChunk == 0 &&
         p.values_batch_stride % kChunk == 0 && aligned_to_16_bytes(p.query) && aligned_to_16_bytes(p.keys) &&
         aligned_to_16_bytes(p.values);
}

cudaError_t launch_attention_forward_tensor_core(const AttentionProblem& p, const AttentionForwardBuffers& out,
                                                 cudaStream_t stream) {
  if (!attention_tensor_core_supported(p, 8) || out.weights != nullptr || out.splits != 1) {
    return cudaErrorInvalidValue;
  }
  if (p.batch * p.query_length == 0) return cudaSuccess;
  return dispatch_tensor_core(p, [&](auto element, auto dim, auto value_dim) {
    using T = decltype(element);
    constexpr int kD = decltype(dim)::value, kDv = decltype(value_dim)::value;
    if (p.score == ScoreKind::kAdditive) {
      return launch_forward<T, ScoreKind::kAdditive, kD, kDv>(p, out, nullptr, nullptr, stream);
    }
    if (p.score == ScoreKind::kCosine) {
      return launch_forward<T, ScoreKind::kCosine, kD, kDv>(p, out, nullptr, nullptr, stream);
    }
    return launch_forward<T, ScoreKind::kDot, kD, kDv>(p, out, nullptr, nullptr, stream);
  });
}

cudaError_t launch_attention_backward_tensor_core(const AttentionProblem& p, const AttentionBackwardBuffers& buffers,
                                                  float* grad_query_accumulator, cudaStream_t stream) {
  if (!attention_tensor_core_supported(p, 8) || buffers.grad_weights != nullptr || p.gaussian ||
      buffers.grad_center != nullptr || !aligned_to_16_bytes(buffers.grad_context) ||
      (p.score == ScoreKind::kAdditive && buffers.grad_v_rows == nullptr) ||
      (buffers.values_are_keys && p.score_dim != p.value_dim)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_tensor_core(p, [&](auto element, auto dim, auto value_dim) {
    using T = decltype(element);
    constexpr int kD = decltype(dim)::value, kDv = decltype(value_dim)::value;
    if (p.score == ScoreKind::kAdditive) {
      return launch_backward<T, ScoreKind::kAdditive, kD, kDv>(p, buffers, grad_query_accumulator, stream);
    }
    if (p.score == ScoreKind::kCosine) {
      return launch_backward<T, ScoreKind::kCosine, kD, kDv>(p, buffers, grad_query_accumulator, stream);
    }
    return launch_backward<T, ScoreKind::kDot, kD, kDv>(p, buffers, grad_query_accumulator, stream);
  });
}

}  // namespace cuda
}  // namespace fastattn
