// attention_tensor_core.cu: the multi-query forward of the fused soft-attention op
// (attention_forward in csrc/ops.cpp) for the "dot" kernel score on the tensor cores,
// flash-attention-2 style: float16 / bfloat16 inputs, head dims D, Dv in {64, 128},
// float accumulation (mma.cuh's m16n8k16 mma.sync).
//
// Fuses Q K^T -> scale -> masks -> online softmax -> Gaussian -> P V for a tile of
// kBlockRows query rows per block (4 warps, 16 rows each; the Q fragments stay in
// registers) over tiles of kBlockKeys keys staged in shared memory (K row-major, V
// transposed, so that both are plain 32-bit fragment loads).  Masks in-kernel as
// attention_forward.cu and csrc/cpu/attention.cpp define them (lengths,
// key_padding_mask, causal, local windows with the Gaussian factor): the block walks
// only the union of its rows' key ranges, so key tiles outside every row's range are
// never loaded.  Writes context and logsumexp (the backward's input, as
// launch_attention_forward does); a fully masked row gives zeros and -inf.
// Not handled (attention_tensor_core_supported says no; the binding keeps
// attention_forward.cu's kernels): other scores and dtypes, other head dims,
// unaligned rows, the weights output, the backward (attention_backward.cu).  No
// cp.async / ldmatrix pipelining: each key tile is loaded, then used.
#include "attention_device.cuh"
#include "mma.cuh"

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

// Shared memory: row_begin, row_end (int64) | row_center (float) | key_hidden (int)
// | Q tile (kBlockRows x (kD + kSkew)) | K tile (kBlockKeys x (kD + kSkew)) | V^T
// tile (kDv x (kBlockKeys + kSkew)), all in T.
template <int kD, int kDv>
constexpr size_t tensor_core_shared_bytes() {
  return 2 * sizeof(int64_t) * kBlockRows + sizeof(float) * kBlockRows + sizeof(int) * kBlockKeys +
         2 * (static_cast<size_t>(kBlockRows + kBlockKeys) * (kD + kSkew) + static_cast<size_t>(kDv) * (kBlockKeys + kSkew));
}

// `rows` rows of `width` elements from `source` (row stride `width`) into shared
// `tile` (row stride width + kSkew), zeros for rows at or past `valid_rows`.
template <typename T, int kWidth>
__device__ __forceinline__ void load_rows(T* tile, const T* source, int rows, int64_t valid_rows) {
  constexpr int kChunks = kWidth / kChunk;
  for (int i = threadIdx.x; i < rows * kChunks; i += kTensorCoreThreads) {
    const int r = i / kChunks, chunk = i % kChunks;
    uint4 data = make_uint4(0, 0, 0, 0);
    if (r < valid_rows) data = *reinterpret_cast<const uint4*>(source + static_cast<int64_t>(r) * kWidth + chunk * kChunk);
    *reinterpret_cast<uint4*>(tile + r * (kWidth + kSkew) + chunk * kChunk) = data;
  }
}

// kBlockKeys value rows from `source` into shared `tile` transposed: element (key k,
// feature d) at tile[d * (kBlockKeys + kSkew) + k]; zeros for keys at or past `valid`.
template <typename T, int kDv>
__device__ __forceinline__ void load_values_transposed(T* tile, const T* source, int64_t valid) {
  constexpr int kChunks = kDv / kChunk;
  for (int i = threadIdx.x; i < kBlockKeys * kChunks; i += kTensorCoreThreads) {
    const int k = i / kChunks, chunk = i % kChunks;
    Pack<T, kChunk> pack;
    if (k < valid) {
      pack = *reinterpret_cast<const Pack<T, kChunk>*>(source + static_cast<int64_t>(k) * kDv + chunk * kChunk);
    } else {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) pack.element[e] = from_acc<T>(0.f);
    }
#pragma unroll
    for (int e = 0; e < kChunk; ++e) tile[(chunk * kChunk + e) * (kBlockKeys + kSkew) + k] = pack.element[e];
  }
}

template <typename T, int kD, int kDv>
__global__ void __launch_bounds__(kTensorCoreThreads)
    attention_forward_tensor_core_kernel(DeviceProblem<T> p, AttentionForwardBuffers out) {
  constexpr int kKeyStride = kD + kSkew, kValueStride = kBlockKeys + kSkew;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  int64_t* row_begin = reinterpret_cast<int64_t*>(shared_bytes);
  int64_t* row_end = row_begin + kBlockRows;
  float* row_center = reinterpret_cast<float*>(row_end + kBlockRows);
  int* key_hidden = reinterpret_cast<int*>(row_center + kBlockRows);
  T* query_tile = reinterpret_cast<T*>(key_hidden + kBlockKeys);
  T* key_tile = query_tile + kBlockRows * kKeyStride;
  T* value_tile = key_tile + kBlockKeys * kKeyStride;

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, group = lane / 4, column = lane % 4;
  const float minus_infinity = negative_infinity<float>();
  const int64_t row_tiles = (p.query_length + kBlockRows - 1) / kBlockRows;

  for (int64_t work = blockIdx.x; work < p.batch * row_tiles; work += gridDim.x) {
    const int64_t n = work / row_tiles, first_row = (work % row_tiles) * kBlockRows;
    const int64_t valid_rows = p.query_length - first_row;
    if (threadIdx.x < kBlockRows) {
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
    load_rows<T, kD>(query_tile, p.query_row(n * p.query_length + first_row), kBlockRows, valid_rows);
    __syncthreads();

    // The keys any row of the block sees: [lowest, highest).
    int64_t lowest = p.source_length, highest = 0;
    for (int r = 0; r < kBlockRows; ++r) {
      if (row_begin[r] >= row_end[r]) continue;
      lowest = row_begin[r] < lowest ? row_begin[r] : lowest;
      highest = row_end[r] > highest ? row_end[r] : highest;
    }

    // This lane's two rows (the accumulator rows group and group + 8 of its warp).
    const int top = warp * kWarpRows + group;
    const int64_t begin[2] = {row_begin[top], row_begin[top + 8]};
    const int64_t end[2] = {row_end[top], row_end[top + 8]};
    const float center[2] = {row_center[top], row_center[top + 8]};
    uint32_t query_fragment[kD / 16][4];
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      load_fragment_a(query_fragment[kk], query_tile + warp * kWarpRows * kKeyStride + kk * 16, kKeyStride);
    }
    OnlineSoftmax<float> softmax[2];  // the sums are this lane's share until the end
    float context[kDv / 8][4];
#pragma unroll
    for (int dt = 0; dt < kDv / 8; ++dt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) context[dt][r] = 0.f;
    }

    for (int64_t tile = lowest; tile < highest; tile += kBlockKeys) {
      const int64_t valid_keys = highest - tile;
      load_rows<T, kD>(key_tile, p.key_row(n, tile), kBlockKeys, valid_keys);
      load_values_transposed<T, kDv>(value_tile, p.value_row(n, tile), valid_keys);
      if (threadIdx.x < kBlockKeys) {
        key_hidden[threadIdx.x] = threadIdx.x >= valid_keys || p.is_padding(n, tile + threadIdx.x);
      }
      __syncthreads();

      float score[kBlockKeys / 8][4];
#pragma unroll
      for (int nt = 0; nt < kBlockKeys / 8; ++nt) {
#pragma unroll
        for (int r = 0; r < 4; ++r) score[nt][r] = 0.f;
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk) {
          uint32_t key_fragment[2];
          load_fragment_b(key_fragment, key_tile + nt * 8 * kKeyStride + kk * 16, kKeyStride);
          mma_m16n8k16<T>(score[nt], query_fragment[kk], key_fragment);
        }
      }

      // Scale and mask; each row's maximum over the tile (the 4 lanes of a group share a row).
      float tile_max[2] = {minus_infinity, minus_infinity};
#pragma unroll
      for (int nt = 0; nt < kBlockKeys / 8; ++nt) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int half = r / 2, key = nt * 8 + 2 * column + r % 2;
          const int64_t j = tile + key;
          const bool visible = j >= begin[half] && j < end[half] && !key_hidden[key];
          score[nt][r] = visible ? score[nt][r] * p.scale : minus_infinity;
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
#pragma unroll
        for (int dt = 0; dt < kDv / 8; ++dt) {
          uint32_t value_fragment[2];
          load_fragment_b(value_fragment, value_tile + dt * 8 * kValueStride + kk * 16, kValueStride);
          mma_m16n8k16<T>(context[dt], probability_fragment, value_fragment);
        }
      }
      __syncthreads();  // the next tile overwrites K, V and key_hidden
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
      T* context_row = static_cast<T*>(out.context) + row * kDv;
#pragma unroll
      for (int dt = 0; dt < kDv / 8; ++dt) {
        *reinterpret_cast<uint32_t*>(context_row + dt * 8 + 2 * column) = pack_pair<T>(
            context[dt][2 * half] * inverse_sum[half], context[dt][2 * half + 1] * inverse_sum[half]);
      }
      if (column == 0) static_cast<float*>(out.logsumexp)[row] = softmax[half].logsumexp();
    }
    __syncthreads();  // the next work item overwrites the row arrays and the Q tile
  }
}

template <typename T, int kD, int kDv>
cudaError_t launch_tensor_core_kernel(const AttentionProblem& p, const AttentionForwardBuffers& out,
                                      cudaStream_t stream) {
  constexpr size_t shared = tensor_core_shared_bytes<kD, kDv>();
  auto kernel = attention_forward_tensor_core_kernel<T, kD, kDv>;
  if (shared > 48 * 1024) {
    const cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
    if (status != cudaSuccess) return status;
  }
  const int64_t work = p.batch * ((p.query_length + kBlockRows - 1) / kBlockRows);
  kernel<<<grid_for(work), kTensorCoreThreads, shared, stream>>>(device_problem<T>(p), out);
  return cudaGetLastError();
}

template <typename T, int kD>
cudaError_t launch_for_value_dim(const AttentionProblem& p, const AttentionForwardBuffers& out,
                                 cudaStream_t stream) {
  if (p.value_dim == 64) return launch_tensor_core_kernel<T, kD, 64>(p, out, stream);
  return launch_tensor_core_kernel<T, kD, 128>(p, out, stream);
}

template <typename T>
cudaError_t launch_for_dims(const AttentionProblem& p, const AttentionForwardBuffers& out, cudaStream_t stream) {
  if (p.score_dim == 64) return launch_for_value_dim<T, 64>(p, out, stream);
  return launch_for_value_dim<T, 128>(p, out, stream);
}

bool head_dim_supported(int64_t dim) { return dim == 64 || dim == 128; }

}  // namespace

bool attention_tensor_core_supported(const AttentionProblem& p, int compute_capability_major) {
  const bool half_precision = p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16;
  auto aligned = [](const void* pointer) { return (reinterpret_cast<uintptr_t>(pointer) & 15u) == 0; };
  return compute_capability_major >= 8 && half_precision && p.score == ScoreKind::kDot &&
         head_dim_supported(p.score_dim) && head_dim_supported(p.value_dim) && p.keys_batch_stride % kChunk == 0 &&
         p.values_batch_stride % kChunk == 0 && aligned(p.query) && aligned(p.keys) && aligned(p.values);
}

cudaError_t launch_attention_forward_tensor_core(const AttentionProblem& p, const AttentionForwardBuffers& out,
                                                 cudaStream_t stream) {
  if (!attention_tensor_core_supported(p, 8) || out.weights != nullptr || out.splits != 1) {
    return cudaErrorInvalidValue;
  }
  if (p.batch * p.query_length == 0) return cudaSuccess;
  if (p.dtype == DType::kFloat16) return launch_for_dims<__half>(p, out, stream);
  return launch_for_dims<__nv_bfloat16>(p, out, stream);
}

}  // namespace cuda
}  // namespace fastattn
