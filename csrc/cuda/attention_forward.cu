// attention_forward.cu: the forward of the fused soft-attention op (attention_forward
// in csrc/ops.cpp) for the three kernel scores (dot, cosine, additive), every mask
// (lengths, key_padding_mask, causal, window), the local-p Gaussian and the optional
// weights output; float32 / float64 / float16 / bfloat16 inputs, float (double for
// float64) accumulation.
//
// Fuses score -> mask -> online softmax -> Gaussian -> context in one pass over the
// keys of each query row; no (N, T, S) tensor exists unless the weights are asked for.
// Tiling: one block of 128 threads per (query row, key split).  The keys of a row's
// [begin, end) range are cut into `splits` contiguous chunks (the decode-step case:
// few rows, many keys, so the keys of one row are spread over many blocks) and each
// chunk is walked in tiles of 32 keys: each warp scores 8 consecutive keys of the
// tile with the loads of all 8 in flight (lanes over the feature dimension, 16-byte
// loads when the rows allow), the tile's maximum updates the online softmax, then
// groups of threads take the tile's keys in turn, each thread adding 8 keys' value
// loads at a time into its group's partial context (shared memory; the groups are
// summed at the end).  With splits > 1 each block writes its unnormalised context,
// max and sum, and combine_splits_kernel merges them.  With weights, the scores go to
// an (N, T, S) scratch, which the block that finishes a row (the forward's, or with
// splits the combine kernel's) turns into exp(score - m) / l * Gaussian from the row's
// max m and sum l, not from logsumexp = m + log l: its rounding to half an ulp of m
// (float32, scores near 30: 1e-6) would reach every weight (write_row_weights).
// The additive tanh (additive_tanh): float16 / bfloat16 split between tanh.approx.f32
// on the special-function unit (7 features in 8) and the project's rational tanh on the
// FMA units (the 8th), the rational tanh for float32, libm's for float64.
// Not handled: tensor cores (the scores are warp dot products, memory-bound at decode
// shapes; multi-query 16-bit dot and additive problems of head dims 64 / 128 go to
// attention_tensor_core.cu, where the query rows of a tile share each key load).  Shared
// memory holds D + groups x Dv accumulators (groups x Dv <= max(Dv, 128 x kVec)):
// D + Dv above about 50k float elements does not fit and the launch reports an error.
#include "attention_device.cuh"

namespace fastattn {
namespace cuda {
namespace {

// Shared memory of the forward kernel: prepared query (D) | partial contexts
// (groups x Dv) | tile scores, probabilities and weights (3 x kTile).
template <typename A, int kVec>
size_t forward_shared_bytes(const AttentionProblem& p) {
  const int64_t groups = row_groups(p.value_dim, kVec).groups;
  return whole_shared_vectors(sizeof(A) * static_cast<size_t>(p.score_dim + groups * p.value_dim + 3 * kTile));
}

// weights[row, j] = row.weight(score_j) * Gaussian_j = exp(score_j - M) / L * Gaussian_j over
// the row's S keys, from the scores scratch (-inf for a masked key: weight 0; all zeros
// for a row with no key).  A row that was not split is a MergedSplits of one split.  The
// block's threads take the keys in turn.
template <typename T>
__device__ void write_row_weights(const DeviceProblem<T>& p, const AttentionForwardBuffers& out, int64_t row,
                                  const MergedSplits<Acc<T>>& stats) {
  using A = Acc<T>;
  const int64_t S = p.source_length, n = row / p.query_length, t = row % p.query_length;
  const A center = p.window_center(n, t);
  const A* scores = static_cast<const A*>(out.scores) + row * S;
  T* weights = static_cast<T*>(out.weights) + row * S;
  for (int64_t j = threadIdx.x; j < S; j += kThreads) {
    weights[j] = from_acc<T>(stats.weight(scores[j]) * p.gaussian_of(j, center));
  }
}

template <typename T, ScoreKind kScore, int kVec>
__global__ void __launch_bounds__(kThreads)
    attention_forward_kernel(DeviceProblem<T> p, AttentionForwardBuffers out) {
  using A = Acc<T>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const RowGroups value_split = row_groups(p.value_dim, kVec);
  A* prepared = reinterpret_cast<A*>(shared_bytes);
  A* context = prepared + p.score_dim;  // groups x Dv
  A* tile_score = context + value_split.groups * p.value_dim;
  A* tile_probability = tile_score + kTile;
  A* tile_weight = tile_probability + kTile;

  const int warp = threadIdx.x / kWarpSize;
  const int group = threadIdx.x / value_split.lanes, group_lane = threadIdx.x % value_split.lanes;
  const int groups = value_split.groups;
  const int64_t rows = p.batch * p.query_length, splits = out.splits, split = blockIdx.y;
  const A minus_infinity = negative_infinity<A>();
  A* scores_out = static_cast<A*>(out.scores);

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t n = row / p.query_length, t = row % p.query_length;
    const KeyRange range = p.keys_of(n, t);
    const A center = p.window_center(n, t);
    const int64_t per_split = (range.end - range.begin + splits - 1) / splits;
    const int64_t chunk_begin = range.begin + split * per_split;
    const int64_t chunk_end = chunk_begin + per_split < range.end ? chunk_begin + per_split : range.end;

    for (int64_t i = threadIdx.x; i < groups * p.value_dim; i += kThreads) context[i] = A(0);
    load_prepared_query<kScore, kVec>(p, row, prepared);  // ends synchronised

    OnlineSoftmax<A> softmax;  // every thread holds the same copy
    for (int64_t tile = chunk_begin; tile < chunk_end; tile += kTile) {
      const int count = static_cast<int>(chunk_end - tile < kTile ? chunk_end - tile : kTile);
      const int first = warp * kKeysPerWarp;
      if (first < count) {
        PairSums<A> sums[kKeysPerWarp];
        warp_tile_sums<kScore, kVec, T>(
            prepared, [&](int c) { return p.key_row(n, tile + c); }, first, count, p.v, p.score_dim, sums);
        for_each_warp_partner(first, count, [&](int k, int c) {
          const int64_t j = tile + c;
          const A score = p.is_padding(n, j) ? minus_infinity : score_of_sums<kScore>(p, sums[k]);
          tile_score[c] = score;
          if (scores_out != nullptr) scores_out[row * p.source_length + j] = score;
        });
      }
      __syncthreads();
      A tile_max = minus_infinity;
      for (int c = 0; c < count; ++c) tile_max = nan_or_max(tile_max, tile_score[c]);
      if (tile_max == minus_infinity) {  // every key of the tile is padding (uniform branch)
        __syncthreads();
        continue;
      }
      const A factor = softmax.raise_max(tile_max);
      if (threadIdx.x < count) {
        const A probability = exp_of(tile_score[threadIdx.x] - softmax.max_score);  // 0 for padding
        tile_probability[threadIdx.x] = probability;
        tile_weight[threadIdx.x] = probability * p.gaussian_of(tile + threadIdx.x, center);
      }
      __syncthreads();
      for (int c = 0; c < count; ++c) softmax.sum += tile_probability[c];
      if (group < groups) {
        A* partial = context + group * p.value_dim;
        for (int64_t d = static_cast<int64_t>(group_lane) * kVec; d < p.value_dim;
             d += static_cast<int64_t>(value_split.lanes) * kVec) {
          A sum[kVec];
#pragma unroll
          for (int i = 0; i < kVec; ++i) sum[i] = partial[d + i] * factor;
          add_rows_in_turn<kVec, A>(
              group, groups, count,
              [&](int c, A(&value)[kVec]) { load_pack<kVec>(p.value_row(n, tile + c) + d, value); },
              [&](int c, const A(&value)[kVec]) { add_weighted<kVec>(tile_weight[c], value, sum); });
#pragma unroll
          for (int i = 0; i < kVec; ++i) partial[d + i] = sum[i];
        }
      }
      __syncthreads();  // the next tile overwrites the tile arrays
    }

    // Each thread sums the groups' partial contexts over the elements it owns.
    const bool whole = splits == 1;
    const A scale = whole ? (softmax.empty() ? A(0) : A(1) / softmax.sum) : A(1);
    T* context_out = static_cast<T*>(out.context) + row * p.value_dim;
    A* partial_out = whole ? nullptr : static_cast<A*>(out.partial_context) + (row * splits + split) * p.value_dim;
    for (int64_t d = static_cast<int64_t>(threadIdx.x) * kVec; d < p.value_dim; d += kThreads * kVec) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        A total = A(0);
        for (int g = 0; g < groups; ++g) total += context[g * p.value_dim + d + i];
        if (whole) {
          context_out[d + i] = from_acc<T>(total * scale);
        } else {
          partial_out[d + i] = total;
        }
      }
    }
    if (whole && out.weights != nullptr) {
      const MergedSplits<A> one_split(
          1, [&](int64_t) { return softmax.max_score; }, [&](int64_t) { return softmax.sum; });
      write_row_weights(p, out, row, one_split);
    }
    if (threadIdx.x == 0) {
      if (whole) {
        static_cast<A*>(out.logsumexp)[row] = softmax.logsumexp();
      } else {
        static_cast<A*>(out.partial_max)[row * splits + split] = softmax.max_score;
        static_cast<A*>(out.partial_sum)[row * splits + split] = softmax.sum;
      }
    }
    __syncthreads();  // the next row overwrites shared memory
  }
}

// Merges the splits of each row (MergedSplits, csrc/common/attention_math.h).  Block
// (row, chunk) merges kThreads elements of the row's context, one a thread; its split
// factors exp(m_s - M) / L (0 for a split without valid keys, whose partial context is
// zero) go to shared memory first, so that the loads of the splits' partial contexts
// carry no branch and are issued together.  Shared memory: splits x A.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    combine_splits_kernel(DeviceProblem<T> p, int64_t rows, int64_t splits, int64_t value_dim,
                          AttentionForwardBuffers out) {
  using A = Acc<T>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  A* split_factor = reinterpret_cast<A*>(shared_bytes);  // splits
  const A* partial_max = static_cast<const A*>(out.partial_max);
  const A* partial_sum = static_cast<const A*>(out.partial_sum);
  const A* partial_context = static_cast<const A*>(out.partial_context);
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const A* row_max = partial_max + row * splits;
    const A* row_sum = partial_sum + row * splits;
    const MergedSplits<A> merged(
        splits, [&](int64_t s) { return row_max[s]; }, [&](int64_t s) { return row_sum[s]; });
    for (int64_t s = threadIdx.x; s < splits; s += kThreads) split_factor[s] = merged.context_factor(row_max[s]);
    __syncthreads();
    if (d < value_dim) {
      const A* partial = partial_context + row * splits * value_dim + d;
      A sum = A(0);
#pragma unroll 8
      for (int64_t s = 0; s < splits; ++s) sum += split_factor[s] * partial[s * value_dim];
      static_cast<T*>(out.context)[row * value_dim + d] = from_acc<T>(sum);
    }
    if (blockIdx.y == 0) {
      if (out.weights != nullptr) write_row_weights(p, out, row, merged);
      if (threadIdx.x == 0) static_cast<A*>(out.logsumexp)[row] = merged.logsumexp();
    }
    __syncthreads();  // the next row overwrites split_factor
  }
}

template <typename T, ScoreKind kScore, int kVec>
cudaError_t launch_forward_kernel(const DeviceProblem<T>& device, const AttentionProblem& p,
                                  const AttentionForwardBuffers& out, cudaStream_t stream) {
  const size_t shared = forward_shared_bytes<Acc<T>, kVec>(p);
  auto kernel = attention_forward_kernel<T, kScore, kVec>;
  if (shared > 48 * 1024) {
    const cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
    if (status != cudaSuccess) return status;
  }
  const dim3 grid(grid_for(p.batch * p.query_length), static_cast<unsigned int>(out.splits));
  kernel<<<grid, kThreads, shared, stream>>>(device, out);
  return cudaGetLastError();
}

template <typename T, ScoreKind kScore>
cudaError_t launch_forward_for_score(const AttentionProblem& p, const AttentionForwardBuffers& out,
                                     cudaStream_t stream) {
  const DeviceProblem<T> device = device_problem<T>(p);
  if (wide_loads_fit<T>(p, nullptr)) return launch_forward_kernel<T, kScore, kWideVec<T>>(device, p, out, stream);
  return launch_forward_kernel<T, kScore, 1>(device, p, out, stream);
}

}  // namespace

int64_t attention_forward_splits(const AttentionProblem& p, int multiprocessors) {
  const int64_t rows = p.batch * p.query_length;
  const int64_t target_blocks = 4 * static_cast<int64_t>(multiprocessors > 0 ? multiprocessors : 1);
  if (rows >= target_blocks || p.source_length < 2 * kTile) return 1;
  int64_t splits = (target_blocks + rows - 1) / rows;
  const int64_t most = p.source_length / kTile;  // at least one tile of keys per split
  if (splits > most) splits = most;
  if (splits > kMaxSplits) splits = kMaxSplits;
  return splits < 1 ? 1 : splits;
}

cudaError_t launch_attention_forward(const AttentionProblem& p, const AttentionForwardBuffers& out,
                                     cudaStream_t stream) {
  const int64_t rows = p.batch * p.query_length;
  if (rows == 0) return cudaSuccess;
  if (out.splits < 1 || out.splits > kMaxSplits) return cudaErrorInvalidValue;
  if (out.splits > 1 && (p.value_dim + kThreads - 1) / kThreads > 65535) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto element) -> cudaError_t {
    using T = decltype(element);
    cudaError_t status = cudaSuccess;
    switch (p.score) {
      case ScoreKind::kDot:
        status = launch_forward_for_score<T, ScoreKind::kDot>(p, out, stream);
        break;
      case ScoreKind::kCosine:
        status = launch_forward_for_score<T, ScoreKind::kCosine>(p, out, stream);
        break;
      case ScoreKind::kAdditive:
        status = launch_forward_for_score<T, ScoreKind::kAdditive>(p, out, stream);
        break;
    }
    if (status != cudaSuccess) return status;
    if (out.splits > 1) {
      const int64_t chunks = (p.value_dim + kThreads - 1) / kThreads;  // one block at least: it writes the lse
      const dim3 grid(grid_for(rows), static_cast<unsigned int>(chunks > 1 ? chunks : 1));
      const size_t shared = whole_shared_vectors(sizeof(Acc<T>) * static_cast<size_t>(out.splits));
      combine_splits_kernel<T>
          <<<grid, kThreads, shared, stream>>>(device_problem<T>(p), rows, out.splits, p.value_dim, out);
      status = cudaGetLastError();
    }
    return status;
  });
}

}  // namespace cuda
}  // namespace fastattn
