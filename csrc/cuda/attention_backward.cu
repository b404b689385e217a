// attention_backward.cu: the gradients of attention_forward (attention_backward in
// csrc/ops.cpp) for the dot, cosine and additive scores, every mask and the local-p
// Gaussian (grad_center), with the optional gradient of the weights output; float32 /
// float64 / float16 / bfloat16 inputs, float (double for float64) accumulation.
//
// Nothing of the forward is read (not even its logsumexp): each row's softmax is
// recomputed, with its own max M and sum L, so that p_j = exp(e_j - M) / L is 1 / L at
// the most probable key whatever the rounding of logsumexp.  With dw_j = grad_context .
// v_j (+ grad_weights_j) and g_j the Gaussian factor, the score gradient is
// de_j = p_j ((g_j dw_j - s) - r), s = g_m dw_m of the most probable key m and
// r = sum_i p_i (g_i dw_i - s) (RowTerms, csrc/common/attention_math.h: exact at m, where
// a peaked row's two near-equal sums would leave rounding noise), the value gradient
// p_j g_j grad_context.
// Two kernels, both deterministic (no atomics), each with tiles of 32 partners:
//  - backward_rows_kernel, one block per (query row, key split): a pass over the row's
//    keys for its row terms (M, L, s, r and grad_center, online: OnlineRowTerms, a
//    tile's merged over a warp by shuffles), a second for grad_query (and, additive,
//    the row's share of grad_v, summed over rows by the caller; grad_bias is the sum of
//    grad_query over rows).  The keys of a row may be split over blocks as the
//    forward's are (a decode step's few rows then fill the GPU): a first launch of the
//    kernel (kRowTermsOnly) writes each split's terms, the second merges them in key
//    order before its second pass, each split writes its partial sums and
//    combine_query_gradient_kernel merges them.  With one query row per batch element
//    (decode steps) each key's gradients come from that row alone: this kernel writes
//    grad_keys and grad_values in the same pass (zeros for the keys outside the row's
//    range) and the second kernel is not run.
//  - backward_keys_kernel, one block per (batch, key): a pass over the queries that
//    see the key for grad_keys and grad_values, from the row terms of the first kernel.
// With values_are_keys (one tensor as keys and values) both kernels add each key's value
// term to its key term before the store and write no grad_values.
// In a tile, warps compute the per-pair scalars (a score and dw each: lanes over the
// feature dimension, 16-byte loads when rows allow; in backward_rows_kernel each warp
// takes 8 keys with their loads in flight together, warp_tile_sums), then each thread
// accumulates the feature elements it owns in shared memory (backward_rows_kernel:
// groups of threads take the tile's keys in turn, 8 keys' loads in flight, RowGroups).
// Not handled: tensor cores; the work is three score passes (about 3x the forward).
// Shared memory holds about 3 D + 2 Dv accumulators (errors beyond the device's limit).
#include "attention_device.cuh"
#include "shared_memory_opt_in.h"

namespace fastattn {
namespace cuda {
namespace {

// Shared memory of backward_rows_kernel: prepared query (D) | grad_context (Dv) |
// grad_query partials (groups x D) | grad_v partials (additive: groups x D) | tile
// arrays (kRowsTileArrays x kTile) | reduction scratch (kWarps) | the row's RowTerms.
constexpr int kRowsTileArrays = 7;
template <typename A>
size_t rows_shared_bytes(const AttentionProblem& p, int vec) {
  const int64_t partials = row_groups(p.score_dim, vec, kThreads, kTile).groups * p.score_dim;
  const int64_t additive = p.score == ScoreKind::kAdditive ? partials : 0;
  return sizeof(A) * static_cast<size_t>(p.score_dim + p.value_dim + partials + additive +
                                     kRowsTileArrays * kTile + kWarps + kRowTermsElements);
}

template <typename A>
size_t keys_shared_bytes(const AttentionProblem& p) {
  return sizeof(A) * static_cast<size_t>(2 * p.score_dim + 2 * p.value_dim + 2 * kTile + kWarps);
}

template <typename T>
__device__ __forceinline__ Acc<T> grad_weight_of(const AttentionBackwardBuffers& in, int64_t index) {
  return in.grad_weights != nullptr ? to_acc(static_cast<const T*>(in.grad_weights)[index]) : Acc<T>(0);
}

// grad_query (and, additive, grad_v) partials += coefficient * d score / d query for one
// partner row `key` of feature elements d .. d + kVec; a zero coefficient (masked key)
// adds nothing, whatever its row holds.  additive_term: the additive score's
// coefficient * v (1 - u^2), which is also the key's gradient.
template <typename T, ScoreKind kScore, int kVec>
__device__ __forceinline__ void add_query_gradient(Acc<T> coefficient, const Acc<T> (&key)[kVec],
                                                   const Acc<T> (&v_part)[kVec], const Acc<T>* prepared, int64_t d,
                                                   Acc<T> (&grad_query)[kVec], Acc<T> (&grad_v)[kVec],
                                                   Acc<T> (&additive_term)[kVec]) {
  using A = Acc<T>;
  if constexpr (kScore == ScoreKind::kAdditive) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const A u = additive_tanh<T, kVec>(prepared[d + i] + key[i], d, i);
      additive_term[i] = coefficient != A(0) ? coefficient * v_part[i] * tanh_derivative(u) : A(0);
      grad_query[i] += additive_term[i];
      grad_v[i] += coefficient != A(0) ? coefficient * u : A(0);
    }
  } else {
    add_weighted<kVec>(coefficient, key, grad_query);
  }
}

// query_total[d] = sum over the `parts` D-long parts at query_parts (stride D) of
// element d, and likewise v_total from v_parts (additive), each element by one thread
// (so a total may overwrite the first part).
template <ScoreKind kScore, typename A>
__device__ __forceinline__ void sum_parts(const A* query_parts, const A* v_parts, int64_t parts, int64_t D,
                                          A* query_total, A* v_total) {
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    A query_sum = A(0), v_sum = A(0);
    for (int64_t part = 0; part < parts; ++part) {
      query_sum += query_parts[part * D + d];
      if (kScore == ScoreKind::kAdditive) v_sum += v_parts[part * D + d];
    }
    query_total[d] = query_sum;
    if (kScore == ScoreKind::kAdditive) v_total[d] = v_sum;
  }
}

// The row's grad_query and grad_v from the groups' partials (summed into group 0's), the
// cosine score's through q / max(|q|, floor), written out (grad_query in T).  Every
// thread of the block calls it; it ends synchronised.
template <typename T, ScoreKind kScore>
__device__ void finish_query_gradient(const DeviceProblem<T>& p, const AttentionBackwardBuffers& in, int64_t row,
                                      int groups, Acc<T>* grad_query, Acc<T>* grad_v, Acc<T> query_norm,
                                      Acc<T>* reduce_scratch) {
  using A = Acc<T>;
  const int64_t D = p.score_dim;
  sum_parts<kScore>(grad_query, grad_v, groups, D, grad_query, grad_v);
  __syncthreads();
  if (kScore == ScoreKind::kCosine) {
    const T* query = p.query_row(row);
    A partial = A(0);
    for (int64_t d = threadIdx.x; d < D; d += kThreads) partial += grad_query[d] * to_acc(query[d]);
    const auto gradient = unit_vector_gradient(query_norm, block_sum(partial, reduce_scratch), cosine_floor_of<T>());
    for (int64_t d = threadIdx.x; d < D; d += kThreads) {
      grad_query[d] = gradient.of(grad_query[d], to_acc(query[d]));
    }
  }
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    static_cast<T*>(in.grad_query)[row * D + d] = from_acc<T>(grad_query[d]);
    if (kScore == ScoreKind::kAdditive) static_cast<A*>(in.grad_v_rows)[row * D + d] = grad_v[d];
  }
  __syncthreads();
}

// The OnlineRowTerms of lanes i and i ^ offset merged in key order (the lower lane's
// keys first): both lanes get the same.
template <typename A>
__device__ __forceinline__ OnlineRowTerms<A> merge_with_lane(const OnlineRowTerms<A>& mine, int offset) {
  OnlineRowTerms<A> other;
  other.max_score = __shfl_xor_sync(0xffffffffu, mine.max_score, offset);
  other.sum = __shfl_xor_sync(0xffffffffu, mine.sum, offset);
  other.shift = __shfl_xor_sync(0xffffffffu, mine.shift, offset);
  other.shifted_sum = __shfl_xor_sync(0xffffffffu, mine.shifted_sum, offset);
  other.center_sum = __shfl_xor_sync(0xffffffffu, mine.center_sum, offset);
  const bool mine_first = (threadIdx.x % kWarpSize & offset) == 0;
  OnlineRowTerms<A> merged = mine_first ? mine : other;
  merged.merge(mine_first ? other : mine);
  return merged;
}

// The OnlineRowTerms of a tile's `count` keys (key c: score, g dw and centre term at
// index c of the arrays; a masked key's score -inf), by one warp, a lane per key, merged
// over the warp in key order: every lane gets the same.
template <typename A>
__device__ __forceinline__ OnlineRowTerms<A> tile_row_terms(const A* score, const A* grad_weight,
                                                            const A* center_term, int count) {
  static_assert(kTile == kWarpSize, "a lane per key of the tile");
  const int lane = threadIdx.x % kWarpSize;
  OnlineRowTerms<A> terms;
  if (lane < count) terms = OnlineRowTerms<A>::of_key(score[lane], grad_weight[lane], center_term[lane]);
  for (int offset = 1; offset < kWarpSize; offset *= 2) terms = merge_with_lane(terms, offset);
  return terms;
}

// kRowTermsOnly: the first launch when a row's keys are split over blocks, which writes
// each split's OnlineRowTerms (pass 1) for the second to merge.
template <typename T, ScoreKind kScore, int kVec, bool kRowTermsOnly>
__global__ void __launch_bounds__(kThreads)
    backward_rows_kernel(DeviceProblem<T> p, AttentionBackwardBuffers in) {
  using A = Acc<T>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const RowGroups key_split = row_groups(p.score_dim, kVec, kThreads, kTile);
  const int groups = key_split.groups;
  const int group = threadIdx.x / key_split.lanes, group_lane = threadIdx.x % key_split.lanes;
  const int64_t D = p.score_dim, Dv = p.value_dim;
  A* prepared = reinterpret_cast<A*>(shared_bytes);  // D: the query as the score uses it
  A* grad_context = prepared + D;                    // Dv
  A* grad_query = grad_context + Dv;                 // groups x D (cosine: of the unit query)
  A* grad_v = grad_query + groups * D;               // groups x D, additive only
  A* tile_score = grad_v + (kScore == ScoreKind::kAdditive ? groups * D : 0);  // pass 1: e_j (masked: -inf)
  A* tile_grad_weight = tile_score + kTile;          // pass 1: g_j dw_j
  A* tile_center_term = tile_grad_weight + kTile;    // pass 1: g_j dw_j (j - c) / sigma^2
  A* tile_coefficient = tile_center_term + kTile;    // grad_query's factor of each key
  A* tile_weight = tile_coefficient + kTile;         // one query row: grad_values_j = weight_j grad_context
  A* tile_key_inverse_norm = tile_weight + kTile;    // one query row, cosine: 1 / max(|k_j|, floor)
  A* tile_key_self = tile_key_inverse_norm + kTile;  // one query row, cosine: grad_keys_j's factor of that times k_j
  A* reduce_scratch = tile_key_self + kTile;
  static_assert(kRowsTileArrays == 7, "tile_score .. tile_key_self");
  RowTerms<A>* shared_row_terms = reinterpret_cast<RowTerms<A>*>(reduce_scratch + kWarps);

  const int warp = threadIdx.x / kWarpSize;
  const int64_t rows = p.batch * p.query_length, splits = in.splits, split = blockIdx.y, S = p.source_length;
  const A minus_infinity = negative_infinity<A>();
  A* grad_center_out = static_cast<A*>(in.grad_center);
  OnlineRowTerms<A>* partial_row_terms = static_cast<OnlineRowTerms<A>*>(in.partial_row_terms);
  // One query row per batch element (a decode step): each key's gradients come from
  // that row alone, so this kernel writes them too and backward_keys_kernel is not run.
  const bool writes_keys = p.query_length == 1;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t n = row / p.query_length, t = row % p.query_length;
    KeyRange range = p.keys_of(n, t);
    const int64_t per_split = (range.end - range.begin + splits - 1) / splits;
    const int64_t chunk_begin = range.begin + split * per_split;
    int64_t chunk_end = chunk_begin + per_split < range.end ? chunk_begin + per_split : range.end;
    const A center = p.window_center(n, t);
    const T* grad_context_row = static_cast<const T*>(in.grad_context) + row * Dv;
    for (int64_t d = threadIdx.x; d < Dv; d += kThreads) grad_context[d] = to_acc(grad_context_row[d]);
    for (int64_t d = threadIdx.x; !kRowTermsOnly && d < groups * D; d += kThreads) {
      grad_query[d] = A(0);
      if (kScore == ScoreKind::kAdditive) grad_v[d] = A(0);
    }
    const A query_norm = load_prepared_query<kScore, kVec>(p, row, prepared);  // synchronises
    // The sums of the warp's keys of a tile (first .. of count): the score's over the
    // keys, dw's (grad_context . value) over the values.
    const auto pair_sums_of_tile = [&](int first, int count, int64_t tile, PairSums<A>(&key_sums)[kKeysPerWarp],
                                       PairSums<A>(&value_sums)[kKeysPerWarp]) {
      warp_tile_sums<kScore, kVec, T>(
          prepared, [&](int c) { return p.key_row(n, tile + c); }, first, count, p.v, D, key_sums);
      warp_tile_sums<ScoreKind::kDot, kVec, T>(
          grad_context, [&](int c) { return p.value_row(n, tile + c); }, first, count, nullptr, Dv, value_sums);
    };

    // Pass 1 over the chunk's keys (the whole row unless it is split): the row terms,
    // warp 0's, each tile's merged over a warp and then into the row's in key order.
    OnlineRowTerms<A> terms;
    for (int64_t tile = chunk_begin; (kRowTermsOnly || splits == 1) && tile < chunk_end; tile += kTile) {
      const int count = static_cast<int>(chunk_end - tile < kTile ? chunk_end - tile : kTile);
      const int first = warp * kKeysPerWarp;
      if (first < count) {
        PairSums<A> key_sums[kKeysPerWarp], value_sums[kKeysPerWarp];
        pair_sums_of_tile(first, count, tile, key_sums, value_sums);
        for_each_warp_partner(first, count, [&](int k, int c) {
          const int64_t j = tile + c;
          A score = minus_infinity, grad_weight = A(0), center_term = A(0);
          if (!p.is_padding(n, j)) {
            score = score_of_sums<kScore>(p, key_sums[k]);
            grad_weight = (value_sums[k].dot + grad_weight_of<T>(in, row * S + j)) * p.gaussian_of(j, center);
            if (grad_center_out != nullptr) center_term = grad_weight * gaussian_log_slope<A>(j, center, p.window);
          }
          tile_score[c] = score;
          tile_grad_weight[c] = grad_weight;
          tile_center_term[c] = center_term;
        });
      }
      __syncthreads();
      if (warp == 0) terms.merge(tile_row_terms(tile_score, tile_grad_weight, tile_center_term, count));
      __syncthreads();
    }
    if (kRowTermsOnly) {
      if (threadIdx.x == 0) partial_row_terms[row * splits + split] = terms;
      __syncthreads();  // the next row overwrites shared memory
      continue;
    }
    if (splits > 1 && threadIdx.x == 0) {  // the splits' terms, merged in key order
      for (int64_t other = 0; other < splits; ++other) terms.merge(partial_row_terms[row * splits + other]);
    }
    if (threadIdx.x == 0) {
      shared_row_terms[0] = terms.finish();
      if (split == 0) {
        static_cast<RowTerms<A>*>(in.row_terms)[row] = terms.finish();
        if (grad_center_out != nullptr) grad_center_out[row] = terms.center_gradient();
      }
    }
    __syncthreads();
    const RowTerms<A> row_terms = shared_row_terms[0];
    if (row_terms.empty()) {  // no key (a fully masked row): zero gradients; a NaN row goes on (NaN)
      range.end = range.begin;
      chunk_end = chunk_begin;
    }
    T* grad_keys_out = static_cast<T*>(in.grad_keys) + n * S * D;
    T* grad_values_out = in.values_are_keys ? nullptr : static_cast<T*>(in.grad_values) + n * S * Dv;
    if (writes_keys) {  // zeros for the keys outside the row's range, shared out among its splits
      const auto zero_share = [&](T* out, int64_t dim, int64_t first, int64_t last) {
        const int64_t total = (last - first) * dim, share = (total + splits - 1) / splits;
        const int64_t begin = first * dim + split * share;
        const int64_t end = begin + share < first * dim + total ? begin + share : first * dim + total;
        for (int64_t e = begin + threadIdx.x; e < end; e += kThreads) out[e] = from_acc<T>(A(0));
      };
      zero_share(grad_keys_out, D, 0, range.begin);
      zero_share(grad_keys_out, D, range.end, S);
      if (!in.values_are_keys) {
        zero_share(grad_values_out, Dv, 0, range.begin);
        zero_share(grad_values_out, Dv, range.end, S);
      }
    }

    // Pass 2 over the split's keys: grad_query (and grad_v) from de_j (RowTerms), the
    // groups of threads taking the tile's keys in turn with kRowUnroll keys' loads in
    // flight.
    for (int64_t tile = chunk_begin; tile < chunk_end; tile += kTile) {
      const int count = static_cast<int>(chunk_end - tile < kTile ? chunk_end - tile : kTile);
      const int first = warp * kKeysPerWarp;
      if (first < count) {
        PairSums<A> key_sums[kKeysPerWarp], value_sums[kKeysPerWarp];
        pair_sums_of_tile(first, count, tile, key_sums, value_sums);
        for_each_warp_partner(first, count, [&](int k, int c) {
          const int64_t j = tile + c;
          A coefficient = A(0), weight = A(0), key_inverse_norm = A(0), key_self = A(0);
          if (!p.is_padding(n, j)) {
            const A key_norm = kScore == ScoreKind::kCosine ? clamped_norm(sqrt(key_sums[k].row_sq), cosine_floor_of<T>()) : A(1);
            const A dw = value_sums[k].dot + grad_weight_of<T>(in, row * p.source_length + j);
            const A probability = row_terms.probability(score_of_sums<kScore>(p, key_sums[k]));
            const A gaussian = p.gaussian_of(j, center);
            const A grad_score = row_terms.score_gradient(probability, dw * gaussian);
            if (kScore == ScoreKind::kDot) coefficient = p.scale * grad_score;
            if (kScore == ScoreKind::kCosine) {  // k through k / max(|k|, floor): d score / d k^ = scale q^
              coefficient = p.scale * grad_score / key_norm;
              const auto gradient =
                  unit_vector_gradient(sqrt(key_sums[k].row_sq), p.scale * grad_score * key_sums[k].dot, cosine_floor_of<T>());
              key_inverse_norm = gradient.inverse_norm;
              key_self = gradient.along_input;
            }
            if (kScore == ScoreKind::kAdditive) coefficient = grad_score;
            weight = probability * gaussian;
          }
          tile_coefficient[c] = coefficient;
          tile_weight[c] = weight;
          tile_key_inverse_norm[c] = key_inverse_norm;
          tile_key_self[c] = key_self;
        });
      }
      __syncthreads();
      if (group < groups) {
        A* query_partial = grad_query + group * D;
        A* v_partial = grad_v + group * D;
        for (int64_t d = static_cast<int64_t>(group_lane) * kVec; d < D;
             d += static_cast<int64_t>(key_split.lanes) * kVec) {
          A v_part[kVec], query_sum[kVec], v_sum[kVec];
          if (kScore == ScoreKind::kAdditive) load_pack<kVec>(p.v + d, v_part);
#pragma unroll
          for (int i = 0; i < kVec; ++i) {
            query_sum[i] = query_partial[d + i];
            v_sum[i] = kScore == ScoreKind::kAdditive ? v_partial[d + i] : A(0);
          }
          add_rows_in_turn<kVec, A>(
              group, groups, count, [&](int c, A(&key)[kVec]) { load_pack<kVec>(p.key_row(n, tile + c) + d, key); },
              [&](int c, const A(&key)[kVec]) {
                A additive_term[kVec];
                add_query_gradient<T, kScore, kVec>(tile_coefficient[c], key, v_part, prepared, d, query_sum, v_sum,
                                                    additive_term);
                if (!writes_keys) return;
                A key_gradient[kVec];
                const A value_weight = in.values_are_keys ? tile_weight[c] : A(0);
#pragma unroll
                for (int i = 0; i < kVec; ++i) {
                  // grad_keys_j = coefficient_j q' (+ b_j k_j / max(|k_j|, floor) for the cosine)
                  const A self =
                      tile_key_self[c] != A(0) ? tile_key_self[c] * (key[i] * tile_key_inverse_norm[c]) : A(0);
                  key_gradient[i] =
                      kScore == ScoreKind::kAdditive ? additive_term[i] : tile_coefficient[c] * prepared[d + i] + self;
                  // + the value term w_j grad_context when the values are the keys (D == Dv)
                  if (value_weight != A(0)) key_gradient[i] += value_weight * grad_context[d + i];
                }
                store_pack<kVec>(grad_keys_out + (tile + c) * D + d, key_gradient);
              });
#pragma unroll
          for (int i = 0; i < kVec; ++i) {
            query_partial[d + i] = query_sum[i];
            if (kScore == ScoreKind::kAdditive) v_partial[d + i] = v_sum[i];
          }
        }
      }
      if (writes_keys && !in.values_are_keys) {  // grad_values_j = w_j grad_context (0 for a masked key,
                                                  // whatever grad_context holds)
        const int64_t chunks = Dv / kVec;
        for (int64_t e = threadIdx.x; e < count * chunks; e += kThreads) {
          const int c = static_cast<int>(e / chunks);
          const int64_t d = e % chunks * kVec;
          const A weight = tile_weight[c];
          A value_gradient[kVec];
#pragma unroll
          for (int i = 0; i < kVec; ++i) value_gradient[i] = weight != A(0) ? weight * grad_context[d + i] : A(0);
          store_pack<kVec>(grad_values_out + (tile + c) * Dv + d, value_gradient);
        }
      }
      __syncthreads();
    }

    if (splits == 1) {
      finish_query_gradient<T, kScore>(p, in, row, groups, grad_query, grad_v, query_norm, reduce_scratch);
    } else {  // this split's sums over the groups, merged by combine_query_gradient_kernel
      const int64_t slot = (row * splits + split) * D;
      A* v_out = kScore == ScoreKind::kAdditive ? static_cast<A*>(in.partial_grad_v) + slot : nullptr;
      sum_parts<kScore>(grad_query, grad_v, groups, D, static_cast<A*>(in.partial_grad_query) + slot, v_out);
    }
    __syncthreads();  // the next row overwrites shared memory
  }
}

// grad_query and grad_v of each row (a block per row) from its splits' partials, then as
// backward_rows_kernel finishes them.  Shared memory: the query as the score uses it
// (D, for the cosine score's norm), grad_query and grad_v (D each), scratch (kWarps).
template <typename T, ScoreKind kScore, int kVec>
__global__ void __launch_bounds__(kThreads)
    combine_query_gradient_kernel(DeviceProblem<T> p, AttentionBackwardBuffers in) {
  using A = Acc<T>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int64_t D = p.score_dim, splits = in.splits, rows = p.batch * p.query_length;
  A* prepared = reinterpret_cast<A*>(shared_bytes);
  A* grad_query = prepared + D;
  A* grad_v = grad_query + D;
  A* reduce_scratch = grad_v + D;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t first = row * splits * D;
    const A* v_parts = kScore == ScoreKind::kAdditive ? static_cast<const A*>(in.partial_grad_v) + first : nullptr;
    sum_parts<kScore>(static_cast<const A*>(in.partial_grad_query) + first, v_parts, splits, D, grad_query, grad_v);
    const A query_norm = load_prepared_query<kScore, kVec>(p, row, prepared);  // synchronises
    finish_query_gradient<T, kScore>(p, in, row, 1, grad_query, grad_v, query_norm, reduce_scratch);
  }
}

template <typename T, ScoreKind kScore, int kVec>
__global__ void __launch_bounds__(kThreads)
    backward_keys_kernel(DeviceProblem<T> p, AttentionBackwardBuffers in) {
  using A = Acc<T>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  A* resident = reinterpret_cast<A*>(shared_bytes);  // D: k
  A* value = resident + p.score_dim;                  // Dv
  A* grad_key = value + p.value_dim;                  // D (cosine: of the unit key)
  A* grad_value = grad_key + p.score_dim;             // Dv
  A* tile_coefficient = grad_value + p.value_dim;
  A* tile_weight = tile_coefficient + kTile;
  A* reduce_scratch = tile_weight + kTile;

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t S = p.source_length, D = p.score_dim, Dv = p.value_dim, T_ = p.query_length;
  const RowTerms<A>* row_terms = static_cast<const RowTerms<A>*>(in.row_terms);
  const T* grad_context = static_cast<const T*>(in.grad_context);
  T* grad_keys_out = static_cast<T*>(in.grad_keys);
  T* grad_values_out = static_cast<T*>(in.grad_values);  // unused with values_are_keys
  const int64_t written_values_dim = in.values_are_keys ? 0 : Dv;

  for (int64_t item = blockIdx.x; item < p.batch * S; item += gridDim.x) {
    const int64_t n = item / S, j = item % S;
    if (p.is_padding(n, j)) {  // no query sees it (uniform branch)
      for (int64_t d = threadIdx.x; d < D; d += kThreads) grad_keys_out[item * D + d] = from_acc<T>(A(0));
      for (int64_t d = threadIdx.x; d < written_values_dim; d += kThreads) {
        grad_values_out[item * Dv + d] = from_acc<T>(A(0));
      }
      continue;
    }
    const T* key = p.key_row(n, j);
    for (int64_t d = threadIdx.x; d < D; d += kThreads) {
      resident[d] = to_acc(key[d]);
      grad_key[d] = A(0);
    }
    const T* value_row = p.value_row(n, j);
    for (int64_t d = threadIdx.x; d < Dv; d += kThreads) {
      value[d] = to_acc(value_row[d]);
      grad_value[d] = A(0);
    }
    // |k| as backward_rows_kernel's pair sums take it (each warp's, the same bits)
    const A key_norm = kScore == ScoreKind::kCosine ? sqrt(warp_square_sum<kVec>(key, D)) : A(0);
    __syncthreads();

    for (int64_t tile = 0; tile < T_; tile += kTile) {
      const int count = static_cast<int>(T_ - tile < kTile ? T_ - tile : kTile);
      for (int c = warp; c < count; c += kWarps) {
        const int64_t t = tile + c, row = n * T_ + t;
        const RowTerms<A> terms = row_terms[row];
        A coefficient = A(0), weight = A(0);
        if (!terms.empty() && p.keys_of(n, t).contains(j)) {  // a NaN row's (sum NaN) passes: NaN gradients
          // The score as backward_rows_kernel computes it, to the bit (pair_sums_of_rows), so
          // that the most probable key's probability is exp(0) / L here too.
          const T* query = p.query_row(row);
          A score, query_norm = A(1);
          if constexpr (kScore == ScoreKind::kCosine) {
            query_norm = clamped_norm(sqrt(warp_square_sum<kVec>(query, D)), cosine_floor_of<T>());
            score = p.scale * (warp_dot_of_divided_row<kVec>(resident, query, query_norm, D) / clamped_norm(key_norm, cosine_floor_of<T>()));
          } else {
            const A dot = pair_sums<kScore, kVec, T>(resident, query, p.v, D, p.bias).dot;
            score = kScore == ScoreKind::kDot ? dot * p.scale : dot;
          }
          const A dw = warp_dot<kVec>(value, grad_context + row * Dv, Dv) + grad_weight_of<T>(in, row * S + j);
          const A probability = terms.probability(score);
          const A gaussian = p.gaussian_of(j, p.window_center(n, t));
          const A grad_score = terms.score_gradient(probability, dw * gaussian);
          weight = probability * gaussian;
          if (kScore == ScoreKind::kDot) coefficient = p.scale * grad_score;
          if (kScore == ScoreKind::kCosine) coefficient = p.scale * grad_score / query_norm;
          if (kScore == ScoreKind::kAdditive) coefficient = grad_score;
        }
        if (lane == 0) {
          tile_coefficient[c] = coefficient;
          tile_weight[c] = weight;
        }
      }
      __syncthreads();
      for (int64_t d = static_cast<int64_t>(threadIdx.x) * kVec; d < D; d += kThreads * kVec) {
        A v_part[kVec], bias[kVec] = {};
        if (kScore == ScoreKind::kAdditive) load_pack<kVec>(p.v + d, v_part);
        if (kScore == ScoreKind::kAdditive && p.bias != nullptr) load_pack<kVec>(p.bias + d, bias);
        // The tile's rows summed on their own, then added: a running sum over all T rows
        // in float erred 4-9x the float32 reference at T = 3000.
        A tile_sum[kVec] = {};
        for (int c = 0; c < count; ++c) {
          const A coefficient = tile_coefficient[c];
          if (coefficient == A(0)) continue;
          A query[kVec];
          load_pack<kVec>(p.query_row(n * T_ + tile + c) + d, query);
#pragma unroll
          for (int i = 0; i < kVec; ++i) {
            if (kScore == ScoreKind::kAdditive) {
              const A u = additive_tanh<T, kVec>(resident[d + i] + (query[i] + bias[i]), d, i);
              tile_sum[i] += coefficient * v_part[i] * tanh_derivative(u);
            } else {
              tile_sum[i] += coefficient * query[i];
            }
          }
        }
#pragma unroll
        for (int i = 0; i < kVec; ++i) grad_key[d + i] += tile_sum[i];
      }
      for (int64_t d = static_cast<int64_t>(threadIdx.x) * kVec; d < Dv; d += kThreads * kVec) {
        A tile_sum[kVec] = {};  // as grad_key's
        for (int c = 0; c < count; ++c) {
          const A weight = tile_weight[c];
          if (weight == A(0)) continue;
          A gradient[kVec];
          load_pack<kVec>(grad_context + (n * T_ + tile + c) * Dv + d, gradient);
#pragma unroll
          for (int i = 0; i < kVec; ++i) tile_sum[i] += weight * gradient[i];
        }
#pragma unroll
        for (int i = 0; i < kVec; ++i) grad_value[d + i] += tile_sum[i];
      }
      __syncthreads();
    }

    if (kScore == ScoreKind::kCosine) {  // through k / max(|k|, floor)
      A partial = A(0);
      for (int64_t d = static_cast<int64_t>(threadIdx.x) * kVec; d < D; d += kThreads * kVec) {
        for (int i = 0; i < kVec; ++i) partial += grad_key[d + i] * to_acc(key[d + i]);
      }
      const auto gradient = unit_vector_gradient(key_norm, block_sum(partial, reduce_scratch), cosine_floor_of<T>());
      for (int64_t d = static_cast<int64_t>(threadIdx.x) * kVec; d < D; d += kThreads * kVec) {
        for (int i = 0; i < kVec; ++i) {
          grad_key[d + i] = gradient.of(grad_key[d + i], to_acc(key[d + i]));
        }
      }
    }
    for (int64_t d = static_cast<int64_t>(threadIdx.x) * kVec; d < D; d += kThreads * kVec) {
      for (int i = 0; i < kVec; ++i) {  // the values' term too when they are the keys (D == Dv)
        const A value_term = in.values_are_keys ? grad_value[d + i] : A(0);
        grad_keys_out[item * D + d + i] = from_acc<T>(grad_key[d + i] + value_term);
      }
    }
    for (int64_t d = static_cast<int64_t>(threadIdx.x) * kVec; d < written_values_dim; d += kThreads * kVec) {
      for (int i = 0; i < kVec; ++i) grad_values_out[item * Dv + d + i] = from_acc<T>(grad_value[d + i]);
    }
    __syncthreads();  // the next key overwrites shared memory
  }
}

// Launches kernel(device, in) over `blocks` blocks with `needed` bytes of shared memory,
// rounded up to whole 16-byte vectors (opting in above the default 48 KiB).
template <typename T>
cudaError_t launch_with_shared(void (*kernel)(DeviceProblem<T>, AttentionBackwardBuffers), dim3 blocks,
                               size_t needed, const DeviceProblem<T>& device, const AttentionBackwardBuffers& in,
                               cudaStream_t stream) {
  const size_t shared = whole_shared_vectors(needed);
  const cudaError_t status = opt_in_shared_bytes(kernel, shared);
  if (status != cudaSuccess) return status;
  kernel<<<blocks, kThreads, shared, stream>>>(device, in);
  return cudaGetLastError();
}

template <typename T, ScoreKind kScore, int kVec>
cudaError_t launch_backward_kernels(const AttentionProblem& p, const AttentionBackwardBuffers& in,
                                    cudaStream_t stream) {
  using A = Acc<T>;
  const DeviceProblem<T> device = device_problem<T>(p);
  const int64_t rows = p.batch * p.query_length, items = p.batch * p.source_length;
  if (rows > 0) {
    const dim3 grid(grid_for(rows), static_cast<unsigned int>(in.splits));
    const size_t shared = rows_shared_bytes<A>(p, kVec);
    cudaError_t status = cudaSuccess;
    if (in.splits > 1) {
      status = launch_with_shared<T>(backward_rows_kernel<T, kScore, kVec, true>, grid, shared, device, in, stream);
      if (status != cudaSuccess) return status;
    }
    status = launch_with_shared<T>(backward_rows_kernel<T, kScore, kVec, false>, grid, shared, device, in, stream);
    if (status != cudaSuccess) return status;
    if (in.splits > 1) {
      status = launch_with_shared<T>(combine_query_gradient_kernel<T, kScore, kVec>, dim3(grid_for(rows)),
                                     sizeof(A) * static_cast<size_t>(3 * p.score_dim + kWarps), device, in, stream);
      if (status != cudaSuccess) return status;
    }
  }
  if (items > 0 && p.query_length != 1) {  // one query row: backward_rows_kernel wrote them
    return launch_with_shared<T>(backward_keys_kernel<T, kScore, kVec>, dim3(grid_for(items)),
                                 keys_shared_bytes<A>(p), device, in, stream);
  }
  return cudaSuccess;
}

template <typename T, ScoreKind kScore>
cudaError_t launch_backward_for_score(const AttentionProblem& p, const AttentionBackwardBuffers& in,
                                      cudaStream_t stream) {
  if (wide_loads_fit<T>(p, in.grad_context)) return launch_backward_kernels<T, kScore, kWideVec<T>>(p, in, stream);
  return launch_backward_kernels<T, kScore, 1>(p, in, stream);
}

}  // namespace

cudaError_t launch_attention_backward(const AttentionProblem& p, const AttentionBackwardBuffers& in,
                                      cudaStream_t stream) {
  const bool additive = p.score == ScoreKind::kAdditive;
  if ((p.batch * p.query_length > 0 && in.row_terms == nullptr) || in.splits < 1 || in.splits > kMaxSplits ||
      (in.splits > 1 && (in.partial_row_terms == nullptr || in.partial_grad_query == nullptr ||
                         (additive && in.partial_grad_v == nullptr))) ||
      (in.values_are_keys && p.score_dim != p.value_dim)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(p.dtype, [&](auto element) -> cudaError_t {
    using T = decltype(element);
    switch (p.score) {
      case ScoreKind::kDot:
        return launch_backward_for_score<T, ScoreKind::kDot>(p, in, stream);
      case ScoreKind::kCosine:
        return launch_backward_for_score<T, ScoreKind::kCosine>(p, in, stream);
      case ScoreKind::kAdditive:
        return launch_backward_for_score<T, ScoreKind::kAdditive>(p, in, stream);
    }
    return cudaErrorInvalidValue;
  });
}

}  // namespace cuda
}  // namespace fastattn
