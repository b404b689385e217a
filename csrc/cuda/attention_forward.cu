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
// few rows, many keys, so the keys of one row are spread over many blocks), and each
// warp of the block walks its own tiles of 8 keys of the chunk (warp w the tiles from
// 8 w, every 32 keys) with no block barrier between tiles: it scores the tile's 8 keys
// with their loads in flight together (lanes over the feature dimension, 16-byte loads
// when the rows allow), updates its own online softmax, then adds the 8 value rows
// into its own partial context (shared memory; each lane kVec elements of a row, the 8
// rows' loads in flight together).  A decode step is memory-bound: what it needs is
// bytes in flight, and a warp that waits on no other keeps its loads going (when the
// values are the keys, as with values=None, a tile's value rows are the rows it has
// just scored).  At the end the block merges its warps' softmaxes and partial contexts
// as splits are merged (MergedSplits).  With splits > 1 each block writes its
// unnormalised context, max and sum, and combine_splits_kernel merges them.  With
// weights, the scores go to an (N, T, S) scratch, which the block that finishes a row
// (the forward's, or with splits the combine kernel's) turns into exp(score - m) / l *
// Gaussian from the row's max m and sum l, not from logsumexp = m + log l: its rounding
// to half an ulp of m (float32, scores near 30: 1e-6) would reach every weight
// (write_row_weights).
// The additive tanh (additive_tanh): float16 / bfloat16 split between tanh.approx.f32
// on the special-function unit (7 features in 8) and the project's rational tanh on the
// FMA units (the 8th), the rational tanh for float32, libm's for float64.
// Not handled: tensor cores (the scores are warp dot products, memory-bound at decode
// shapes; multi-query 16-bit dot and additive problems of head dims 64 / 128 go to
// attention_tensor_core.cu, where the query rows of a tile share each key load).  Shared
// memory holds D + 4 x Dv accumulators (float, double for float64): D + 4 Dv above about
// 56k float elements (28k for float64) does not fit an H100 / H200 block and the launch
// reports an error.
#include "attention_device.cuh"
#include "shared_memory_opt_in.h"

namespace fastattn {
namespace cuda {
namespace {

// Blocks of the forward kernel resident on a multiprocessor at once: its launch bounds
// hold it to 128 registers a thread.  attention_forward_splits makes at most this many
// blocks a multiprocessor, so that a decode step's blocks run in one wave.
constexpr int kResidentBlocks = 4;

// Shared memory of the forward kernel: prepared query (D) | each warp's partial context
// (kWarps x Dv) | each warp's softmax max and sum (2 x kWarps).
template <typename A>
size_t forward_shared_bytes(const AttentionProblem& p) {
  return whole_shared_vectors(sizeof(A) * static_cast<size_t>(p.score_dim + kWarps * p.value_dim + 2 * kWarps));
}

// weights[row, j] = row.weight(score_j) * Gaussian_j = exp(score_j - M) / L * Gaussian_j over
// the row's S keys, from the scores scratch (-inf for a masked key: weight 0; all zeros
// for a row with no key).  A row that was not split is a MergedSplits of its block's
// warps.  The block's threads take the keys in turn.
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

// One warp's pass over its keys of a chunk: the tiles of kKeysPerWarp keys from
// chunk_begin + warp * kKeysPerWarp, every kTile keys.  It scores a tile's keys with all
// their loads in flight, updates its own online softmax (every lane holds the same copy)
// and adds the tile's value rows into its partial context (shared memory, kVec elements
// a lane, the tile's value loads in flight together), with no block barrier: each warp
// streams its keys and values at its own pace.  Returns the warp's softmax.
template <typename T, ScoreKind kScore, int kVec>
__device__ __forceinline__ OnlineSoftmax<Acc<T>> warp_forward_pass(const DeviceProblem<T>& p, int64_t row,
                                                                    int64_t chunk_begin, int64_t chunk_end,
                                                                    const Acc<T>* prepared, Acc<T>* partial,
                                                                    Acc<T>* scores_out) {
  using A = Acc<T>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t n = row / p.query_length, t = row % p.query_length;
  const A center = p.window_center(n, t);
  const A minus_infinity = negative_infinity<A>();
  OnlineSoftmax<A> softmax;
  for (int64_t tile = chunk_begin + warp * kKeysPerWarp; tile < chunk_end; tile += kTile) {
    const int count = static_cast<int>(chunk_end - tile < kKeysPerWarp ? chunk_end - tile : kKeysPerWarp);
    PairSums<A> sums[kKeysPerWarp];
    warp_tile_sums<kScore, kVec, T>(
        prepared, [&](int c) { return p.key_row(n, tile + c); }, 0, count, p.v, p.score_dim, sums);
    A score[kKeysPerWarp];
    A tile_max = minus_infinity;
#pragma unroll
    for (int k = 0; k < kKeysPerWarp; ++k) {
      score[k] = k < count && !p.is_padding(n, tile + k) ? score_of_sums<kScore>(p, sums[k]) : minus_infinity;
      if (k < count) tile_max = nan_or_max(tile_max, score[k]);
      if (scores_out != nullptr && k < count && lane == k) scores_out[row * p.source_length + tile + k] = score[k];
    }
    if (tile_max == minus_infinity) continue;  // every key of the tile is padding (uniform over the warp)
    const A factor = softmax.raise_max(tile_max);
    A weight[kKeysPerWarp];
#pragma unroll
    for (int k = 0; k < kKeysPerWarp; ++k) {
      const A probability = exp_of(score[k] - softmax.max_score);  // 0 for padding and past count
      softmax.sum += probability;
      weight[k] = probability * p.gaussian_of(tile + k, center);
    }
    for (int64_t d = static_cast<int64_t>(lane) * kVec; d < p.value_dim; d += kWarpSize * kVec) {
      A sum[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) sum[i] = partial[d + i] * factor;
      A value[kKeysPerWarp][kVec];
#pragma unroll
      for (int k = 0; k < kKeysPerWarp; ++k) load_pack<kVec>(p.value_row(n, tile + (k < count ? k : count - 1)) + d, value[k]);
#pragma unroll
      for (int k = 0; k < kKeysPerWarp; ++k) add_weighted<kVec>(weight[k], value[k], sum);
#pragma unroll
      for (int i = 0; i < kVec; ++i) partial[d + i] = sum[i];
    }
  }
  return softmax;
}

template <typename T, ScoreKind kScore, int kVec>
__global__ void __launch_bounds__(kThreads, kResidentBlocks)
    attention_forward_kernel(DeviceProblem<T> p, AttentionForwardBuffers out) {
  using A = Acc<T>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  A* prepared = reinterpret_cast<A*>(shared_bytes);
  A* context = prepared + p.score_dim;  // kWarps x Dv
  A* warp_max = context + kWarps * p.value_dim;
  A* warp_sum = warp_max + kWarps;

  const int warp = threadIdx.x / kWarpSize;
  const int64_t rows = p.batch * p.query_length, splits = out.splits, split = blockIdx.y;
  A* scores_out = static_cast<A*>(out.scores);

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t n = row / p.query_length, t = row % p.query_length;
    const KeyRange range = p.keys_of(n, t);
    const int64_t per_split = (range.end - range.begin + splits - 1) / splits;
    const int64_t chunk_begin = range.begin + split * per_split;
    const int64_t chunk_end = chunk_begin + per_split < range.end ? chunk_begin + per_split : range.end;

    for (int64_t i = threadIdx.x; i < kWarps * p.value_dim; i += kThreads) context[i] = A(0);
    load_prepared_query<kScore, kVec>(p, row, prepared);  // ends synchronised
    const OnlineSoftmax<A> softmax = warp_forward_pass<T, kScore, kVec>(
        p, row, chunk_begin, chunk_end, prepared, context + warp * p.value_dim, scores_out);
    if (threadIdx.x % kWarpSize == 0) {
      warp_max[warp] = softmax.max_score;
      warp_sum[warp] = softmax.sum;
    }
    __syncthreads();

    // The block's softmax is its warps' merged (MergedSplits), and each thread sums the
    // warps' partial contexts over the elements it owns, each warp's scaled to the merged
    // max (and divided by the sum when the row was not split).
    const MergedSplits<A> merged(
        kWarps, [&](int64_t w) { return warp_max[w]; }, [&](int64_t w) { return warp_sum[w]; });
    const bool whole = splits == 1;
    A factor[kWarps];
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      factor[w] = whole ? merged.context_factor(warp_max[w]) : merged.rescale(warp_max[w]);
    }
    T* context_out = static_cast<T*>(out.context) + row * p.value_dim;
    A* partial_out = whole ? nullptr : static_cast<A*>(out.partial_context) + (row * splits + split) * p.value_dim;
    for (int64_t d = threadIdx.x; d < p.value_dim; d += kThreads) {
      A total = A(0);
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += factor[w] != A(0) ? factor[w] * context[w * p.value_dim + d] : A(0);
      if (whole) {
        context_out[d] = from_acc<T>(total);
      } else {
        partial_out[d] = total;
      }
    }
    if (whole && out.weights != nullptr) write_row_weights(p, out, row, merged);
    if (threadIdx.x == 0) {
      if (whole) {
        static_cast<A*>(out.logsumexp)[row] = merged.logsumexp();
      } else {
        static_cast<A*>(out.partial_max)[row * splits + split] = merged.max_score;
        static_cast<A*>(out.partial_sum)[row * splits + split] = merged.sum;
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
  const size_t shared = forward_shared_bytes<Acc<T>>(p);
  auto kernel = attention_forward_kernel<T, kScore, kVec>;
  const cudaError_t status = opt_in_shared_bytes(kernel, shared);
  if (status != cudaSuccess) return status;
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
  const int64_t resident = kResidentBlocks * static_cast<int64_t>(multiprocessors > 0 ? multiprocessors : 1);
  if (rows >= resident || p.source_length < 2 * kTile) return 1;
  int64_t splits = resident / rows;  // rounded down: the blocks run in one wave
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
