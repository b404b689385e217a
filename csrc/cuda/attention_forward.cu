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
// chunk is walked in tiles of 32 keys: each warp scores keys of the tile (lanes over
// the feature dimension, 16-byte loads when the rows allow), the tile's maximum
// updates the online softmax, then every thread updates the context elements it owns
// (kept in shared memory, 16-byte value loads).  With splits > 1 each block writes
// its unnormalised context, max and sum, and combine_splits_kernel merges them.  With
// weights, the scores go to an (N, T, S) scratch and attention_weights_kernel turns
// them into exp(score - logsumexp) * Gaussian.
// Not handled: tensor cores (the scores are warp dot products, memory-bound at decode
// shapes, not at large multi-query shapes); the additive tanh is the project's
// rational approximation on the FMA units for float (no tanh.approx / SFU split),
// libm tanh for double.  Shared memory holds D + Dv accumulators: D + Dv above about
// 50k float elements does not fit and the launch reports an error.
#include "attention_device.cuh"

namespace fastattn {
namespace cuda {
namespace {

// Shared memory of the forward kernel: prepared query (D) | context (Dv) | tile
// scores, probabilities and weights (3 x kTile) | reduction scratch (kWarps).
template <typename A>
size_t forward_shared_bytes(const AttentionProblem& p) {
  return sizeof(A) * static_cast<size_t>(p.score_dim + p.value_dim + 3 * kTile + kWarps);
}

template <typename T, ScoreKind kScore, int kVec>
__global__ void __launch_bounds__(kThreads)
    attention_forward_kernel(DeviceProblem<T> p, AttentionForwardBuffers out) {
  using A = Acc<T>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  A* prepared = reinterpret_cast<A*>(shared_bytes);
  A* context = prepared + p.score_dim;
  A* tile_score = context + p.value_dim;
  A* tile_probability = tile_score + kTile;
  A* tile_weight = tile_probability + kTile;
  A* reduce_scratch = tile_weight + kTile;

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
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

    for (int64_t d = static_cast<int64_t>(threadIdx.x) * kVec; d < p.value_dim; d += kThreads * kVec) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) context[d + i] = A(0);
    }
    load_prepared_query<kScore>(p, row, prepared, reduce_scratch);  // ends synchronised

    OnlineSoftmax<A> softmax;  // every thread holds the same copy
    for (int64_t tile = chunk_begin; tile < chunk_end; tile += kTile) {
      const int count = static_cast<int>(chunk_end - tile < kTile ? chunk_end - tile : kTile);
      for (int c = warp; c < count; c += kWarps) {
        const int64_t j = tile + c;
        const A score = p.is_padding(n, j)
                            ? minus_infinity
                            : score_with_resident_query<kScore, kVec>(p, prepared, p.key_row(n, j));
        if (lane == 0) {
          tile_score[c] = score;
          if (scores_out != nullptr) scores_out[row * p.source_length + j] = score;
        }
      }
      __syncthreads();
      A tile_max = minus_infinity;
      for (int c = 0; c < count; ++c) tile_max = tile_score[c] > tile_max ? tile_score[c] : tile_max;
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
      for (int64_t d = static_cast<int64_t>(threadIdx.x) * kVec; d < p.value_dim; d += kThreads * kVec) {
        A sum[kVec];
#pragma unroll
        for (int i = 0; i < kVec; ++i) sum[i] = context[d + i] * factor;
        for (int c = 0; c < count; ++c) {
          const A weight = tile_weight[c];
          if (weight == A(0)) continue;
          A value[kVec];
          load_pack<kVec>(p.value_row(n, tile + c) + d, value);
#pragma unroll
          for (int i = 0; i < kVec; ++i) sum[i] += weight * value[i];
        }
#pragma unroll
        for (int i = 0; i < kVec; ++i) context[d + i] = sum[i];
      }
      __syncthreads();  // the next tile overwrites the tile arrays
    }

    // Each thread writes the context elements it owns (no synchronisation needed).
    if (splits == 1) {
      const bool empty = softmax.empty();
      const A inverse_sum = empty ? A(0) : A(1) / softmax.sum;
      T* context_out = static_cast<T*>(out.context) + row * p.value_dim;
      for (int64_t d = static_cast<int64_t>(threadIdx.x) * kVec; d < p.value_dim; d += kThreads * kVec) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) context_out[d + i] = from_acc<T>(context[d + i] * inverse_sum);
      }
      if (threadIdx.x == 0) static_cast<A*>(out.logsumexp)[row] = softmax.logsumexp();
    } else {
      const int64_t slot = row * splits + split;
      A* partial = static_cast<A*>(out.partial_context) + slot * p.value_dim;
      for (int64_t d = static_cast<int64_t>(threadIdx.x) * kVec; d < p.value_dim; d += kThreads * kVec) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) partial[d + i] = context[d + i];
      }
      if (threadIdx.x == 0) {
        static_cast<A*>(out.partial_max)[slot] = softmax.max_score;
        static_cast<A*>(out.partial_sum)[slot] = softmax.sum;
      }
    }
    __syncthreads();  // the next row overwrites shared memory
  }
}

// Merges the splits of each row: context = sum_s exp(m_s - M) C_s / sum_s exp(m_s - M) l_s.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    combine_splits_kernel(int64_t rows, int64_t splits, int64_t value_dim, AttentionForwardBuffers out) {
  using A = Acc<T>;
  const A minus_infinity = negative_infinity<A>();
  const A* partial_max = static_cast<const A*>(out.partial_max);
  const A* partial_sum = static_cast<const A*>(out.partial_sum);
  const A* partial_context = static_cast<const A*>(out.partial_context);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    A max_score = minus_infinity;
    for (int64_t s = 0; s < splits; ++s) {
      const A m = partial_max[row * splits + s];
      max_score = m > max_score ? m : max_score;
    }
    A total = A(0);
    if (max_score != minus_infinity) {
      for (int64_t s = 0; s < splits; ++s) {
        const A m = partial_max[row * splits + s];
        if (m != minus_infinity) total += exp_of(m - max_score) * partial_sum[row * splits + s];
      }
    }
    const bool empty = !(total > A(0));
    T* context = static_cast<T*>(out.context) + row * value_dim;
    for (int64_t d = threadIdx.x; d < value_dim; d += blockDim.x) {
      A sum = A(0);
      if (!empty) {
        for (int64_t s = 0; s < splits; ++s) {
          const A m = partial_max[row * splits + s];
          if (m != minus_infinity) sum += exp_of(m - max_score) * partial_context[(row * splits + s) * value_dim + d];
        }
        sum /= total;
      }
      context[d] = from_acc<T>(sum);
    }
    if (threadIdx.x == 0) static_cast<A*>(out.logsumexp)[row] = empty ? minus_infinity : max_score + log_of(total);
  }
}

// weights[n, t, j] = exp(score - logsumexp) * Gaussian, 0 for masked keys and rows.
template <typename T>
__global__ void attention_weights_kernel(DeviceProblem<T> p, AttentionForwardBuffers out) {
  using A = Acc<T>;
  const A minus_infinity = negative_infinity<A>();
  const int64_t total = p.batch * p.query_length * p.source_length;
  const A* scores = static_cast<const A*>(out.scores);
  const A* logsumexp = static_cast<const A*>(out.logsumexp);
  T* weights = static_cast<T*>(out.weights);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / p.source_length, j = i % p.source_length;
    const A score = scores[i], lse = logsumexp[row];
    A weight = A(0);
    if (score != minus_infinity && lse != minus_infinity) {
      const int64_t n = row / p.query_length, t = row % p.query_length;
      weight = exp_of(score - lse) * p.gaussian_of(j, p.window_center(n, t));
    }
    weights[i] = from_acc<T>(weight);
  }
}

template <typename T, ScoreKind kScore, int kVec>
cudaError_t launch_forward_kernel(const DeviceProblem<T>& device, const AttentionProblem& p,
                                  const AttentionForwardBuffers& out, cudaStream_t stream) {
  const size_t shared = forward_shared_bytes<Acc<T>>(p);
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
  if (splits > 256) splits = 256;
  return splits < 1 ? 1 : splits;
}

cudaError_t launch_attention_forward(const AttentionProblem& p, const AttentionForwardBuffers& out,
                                     cudaStream_t stream) {
  const int64_t rows = p.batch * p.query_length;
  if (rows == 0) return cudaSuccess;
  if (out.splits < 1 || out.splits > 65535) return cudaErrorInvalidValue;
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
      combine_splits_kernel<T><<<grid_for(rows), kThreads, 0, stream>>>(rows, out.splits, p.value_dim, out);
      status = cudaGetLastError();
      if (status != cudaSuccess) return status;
    }
    if (out.weights != nullptr && p.source_length > 0) {
      const int64_t total = rows * p.source_length;
      const int64_t blocks = (total + 255) / 256;
      attention_weights_kernel<T><<<grid_for(blocks < 65536 * 16 ? blocks : 65536 * 16), 256, 0, stream>>>(
          device_problem<T>(p), out);
      status = cudaGetLastError();
    }
    return status;
  });
}

}  // namespace cuda
}  // namespace fastattn
