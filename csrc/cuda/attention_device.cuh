// attention_device.cuh: the device-side view of an attention problem (typed pointers,
// masks, the Gaussian) and the warp-level score of one (query, key) pair, shared by
// attention_forward.cu and attention_backward.cu.  The scalar maths (key ranges,
// online softmax, tanh, norm floor, unit-vector gradient) is csrc/common/attention_math.h,
// the same code the CPU kernels run.
#pragma once

#include "additive_tanh.cuh"
#include "device_common.cuh"

namespace fastattn {
namespace cuda {

constexpr int kThreads = 128;                  // threads per block of the attention kernels
constexpr int kWarps = kThreads / kWarpSize;   // warps per block
constexpr int kTile = 32;                      // partners (keys or queries) per tile
constexpr int kKeysPerWarp = kTile / kWarps;   // partners a warp takes at once (warp_tile_sums)

// How the partners (keys or queries) of a tile are shared out.  Scores: warp w takes
// the kKeysPerWarp consecutive partners from w * kKeysPerWarp and issues the loads of
// all of them at once (warp_tile_sums).  Rows summed with per-partner weights by the
// block (the backward's keys for grad_query): in RowGroups (device_common.cuh) of the
// block's kThreads, at most kTile of them.
constexpr int64_t kMaxSplits = 256;  // key splits of a row (attention_forward_splits)

// AttentionProblem with typed pointers.  T: element type, A: accumulation type.
template <typename T>
struct DeviceProblem {
  using A = Acc<T>;
  int64_t batch, query_length, source_length, score_dim, value_dim;
  const T* query;
  const T* keys;
  int64_t keys_batch_stride;
  const T* values;
  int64_t values_batch_stride;
  const T* v;
  const T* bias;
  A scale;
  const int64_t* lengths;
  const bool* key_padding_mask;
  bool causal;
  int64_t window;
  const A* center;
  bool gaussian;

  __device__ const T* query_row(int64_t row) const { return query + row * score_dim; }
  __device__ const T* key_row(int64_t n, int64_t j) const { return keys + n * keys_batch_stride + j * score_dim; }
  __device__ const T* value_row(int64_t n, int64_t j) const {
    return values + n * values_batch_stride + j * value_dim;
  }
  __device__ bool is_padding(int64_t n, int64_t j) const {
    return key_padding_mask != nullptr && key_padding_mask[n * source_length + j];
  }
  __device__ A window_center(int64_t n, int64_t t) const {
    return center != nullptr ? center[n * query_length + t] : static_cast<A>(t);
  }
  // The keys [begin, end) query t of batch n may see before key_padding_mask.
  __device__ KeyRange keys_of(int64_t n, int64_t t) const {
    const int64_t length = lengths != nullptr ? lengths[n] : source_length;
    return key_range<A>(t, source_length, length, causal, window, window >= 0 ? window_center(n, t) : A(0));
  }
  // The Gaussian factor of key j for query (n, t) (1 without it).
  __device__ A gaussian_of(int64_t j, A center_value) const {
    return gaussian ? gaussian_factor<A>(j, center_value, window) : A(1);
  }
};

template <typename T>
DeviceProblem<T> device_problem(const AttentionProblem& p) {
  DeviceProblem<T> d;
  d.batch = p.batch;
  d.query_length = p.query_length;
  d.source_length = p.source_length;
  d.score_dim = p.score_dim;
  d.value_dim = p.value_dim;
  d.query = static_cast<const T*>(p.query);
  d.keys = static_cast<const T*>(p.keys);
  d.keys_batch_stride = p.keys_batch_stride;
  d.values = static_cast<const T*>(p.values);
  d.values_batch_stride = p.values_batch_stride;
  d.v = static_cast<const T*>(p.v);
  d.bias = static_cast<const T*>(p.bias);
  d.scale = static_cast<Acc<T>>(p.scale);
  d.lengths = p.lengths;
  d.key_padding_mask = p.key_padding_mask;
  d.causal = p.causal;
  d.window = p.window;
  d.center = static_cast<const Acc<T>*>(p.center);
  d.gaussian = p.gaussian;
  return d;
}

// Whether 16-byte loads are safe for every row the kernels read with them: keys,
// values, queries, grad_context (rows of D or Dv elements), v and bias (the backward's
// pair_sums_of_rows row_bias and backward_keys_kernel load it in packs).
template <typename T>
bool wide_loads_fit(const AttentionProblem& p, const void* grad_context) {
  constexpr int kVec = kWideVec<T>;
  return p.score_dim % kVec == 0 && p.value_dim % kVec == 0 && p.keys_batch_stride % kVec == 0 &&
         p.values_batch_stride % kVec == 0 && aligned16(p.query) && aligned16(p.keys) && aligned16(p.values) &&
         (p.v == nullptr || aligned16(p.v)) && (p.bias == nullptr || aligned16(p.bias)) &&
         (grad_context == nullptr || aligned16(grad_context));
}

// Per-lane partial sums of one pair, reduced over the warp by pair_sums.
template <typename A>
struct PairSums {
  A dot;     // dot, cosine: resident . row; additive: v . tanh(resident + row)
  A row_sq;  // cosine: row . row
};

// The sums of the kRows pairs (resident, rows[r]) over the feature dimension `dim`, by
// one warp (every lane gets them): `resident` is the shared-memory vector of the block
// (a prepared query or key), rows[r] global rows (keys or queries) read with kVec-wide
// loads.  Each step issues the loads of all kRows rows before it uses them, so a warp
// keeps kRows loads a lane in flight: what a memory-bound decode step needs.
// row_bias (additive, or null): added to each row element first, tanh(resident + (x +
// bias)), so that a key resident and query rows give the bits of a query resident
// prepared with the bias (q + bias) and key rows, tanh((q + bias) + k).  Every sum here
// (and in warp_square_sum, warp_dot_of_divided_row) runs over the same lanes in the same
// order, so that a pair gives the same score from either side.
template <ScoreKind kScore, int kVec, int kRows, typename T>
__device__ __forceinline__ void pair_sums_of_rows(const Acc<T>* resident, const T* const (&rows)[kRows], const T* v,
                                                  int64_t dim, PairSums<Acc<T>> (&sums)[kRows],
                                                  const T* row_bias = nullptr) {
  using A = Acc<T>;
  const int lane = threadIdx.x % kWarpSize;
  A dot[kRows], row_sq[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) dot[r] = row_sq[r] = A(0);
  for (int64_t d = static_cast<int64_t>(lane) * kVec; d < dim; d += kWarpSize * kVec) {
    A x[kRows][kVec];
#pragma unroll
    for (int r = 0; r < kRows; ++r) load_pack<kVec>(rows[r] + d, x[r]);
    if constexpr (kScore == ScoreKind::kAdditive) {
      A w[kVec];
      load_pack<kVec>(v + d, w);
      if (row_bias != nullptr) {
        A bias[kVec];
        load_pack<kVec>(row_bias + d, bias);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
#pragma unroll
          for (int i = 0; i < kVec; ++i) x[r][i] = x[r][i] + bias[i];
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) dot[r] += w[i] * additive_tanh<T, kVec>(resident[d + i] + x[r][i], d, i);
      }
    } else {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          dot[r] += resident[d + i] * x[r][i];
          if constexpr (kScore == ScoreKind::kCosine) row_sq[r] += x[r][i] * x[r][i];
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    sums[r].dot = warp_sum(dot[r]);
    sums[r].row_sq = kScore == ScoreKind::kCosine ? warp_sum(row_sq[r]) : A(0);
  }
}

// The sums of one pair (pair_sums_of_rows of one row).
template <ScoreKind kScore, int kVec, typename T>
__device__ __forceinline__ PairSums<Acc<T>> pair_sums(const Acc<T>* resident, const T* row, const T* v, int64_t dim,
                                                     const T* row_bias = nullptr) {
  const T* const rows[1] = {row};
  PairSums<Acc<T>> sums[1];
  pair_sums_of_rows<kScore, kVec, 1, T>(resident, rows, v, dim, sums, row_bias);
  return sums[0];
}

// sum over d of term(d, row[d]) by one warp (every lane gets it), the elements shared
// out over the lanes and added in the order pair_sums_of_rows adds them.
template <int kVec, typename T, typename Term>
__device__ __forceinline__ Acc<T> warp_row_sum(const T* row, int64_t dim, Term term) {
  using A = Acc<T>;
  A sum = A(0);
  for (int64_t d = static_cast<int64_t>(threadIdx.x % kWarpSize) * kVec; d < dim; d += kWarpSize * kVec) {
    A x[kVec];
    load_pack<kVec>(row + d, x);
#pragma unroll
    for (int i = 0; i < kVec; ++i) sum += term(d + i, x[i]);
  }
  return warp_sum(sum);
}

// row . row: pair_sums_of_rows' row_sq of that row.
template <int kVec, typename T>
__device__ __forceinline__ Acc<T> warp_square_sum(const T* row, int64_t dim) {
  return warp_row_sum<kVec>(row, dim, [](int64_t, Acc<T> x) { return x * x; });
}

// resident . (row / divisor), each element divided before its product: the cosine
// score's dot of load_prepared_query's unit query (row: the query) and a key (resident),
// from the key's side.
template <int kVec, typename T>
__device__ __forceinline__ Acc<T> warp_dot_of_divided_row(const Acc<T>* resident, const T* row, Acc<T> divisor,
                                                          int64_t dim) {
  return warp_row_sum<kVec>(row, dim, [&](int64_t d, Acc<T> x) { return resident[d] * (x / divisor); });
}

// The sums of the warp's share of a tile: partners first .. first + kKeysPerWarp - 1
// of the tile's `count`, row_of(c) being partner c's global row, all their loads in
// flight together.  Partners past `count` repeat the last one; the caller drops them.
template <ScoreKind kScore, int kVec, typename T, typename RowOf>
__device__ __forceinline__ void warp_tile_sums(const Acc<T>* resident, RowOf row_of, int first, int count, const T* v,
                                               int64_t dim, PairSums<Acc<T>> (&sums)[kKeysPerWarp]) {
  const T* rows[kKeysPerWarp];
#pragma unroll
  for (int k = 0; k < kKeysPerWarp; ++k) rows[k] = row_of(first + k < count ? first + k : count - 1);
  pair_sums_of_rows<kScore, kVec, kKeysPerWarp, T>(resident, rows, v, dim, sums);
}

// Calls body(k, c) on lane 0 for each of the warp's partners in a tile: k = 0, 1, ...
// while c = first + k < count (the partners warp_tile_sums summed).
template <typename Body>
__device__ __forceinline__ void for_each_warp_partner(int first, int count, Body body) {
  if (threadIdx.x % kWarpSize != 0) return;
#pragma unroll
  for (int k = 0; k < kKeysPerWarp; ++k) {
    if (first + k >= count) break;
    body(k, first + k);
  }
}

// resident . row over dim by one warp (every lane gets it): dw = grad_context . value.
template <int kVec, typename T>
__device__ __forceinline__ Acc<T> warp_dot(const Acc<T>* resident, const T* row, int64_t dim) {
  return pair_sums<ScoreKind::kDot, kVec, T>(resident, row, nullptr, dim).dot;
}

// The score of a pair from its sums when the query is the resident vector, prepared
// by load_prepared_query: q (dot), q / max(|q|, floor) (cosine), q + bias (additive).
template <ScoreKind kScore, typename T>
__device__ __forceinline__ Acc<T> score_of_sums(const DeviceProblem<T>& p, const PairSums<Acc<T>>& sums) {
  if constexpr (kScore == ScoreKind::kDot) return sums.dot * p.scale;
  if constexpr (kScore == ScoreKind::kCosine) return p.scale * (sums.dot / clamped_norm(sqrt(sums.row_sq), cosine_floor_of<T>()));
  return sums.dot;
}

// Loads query row `row` into shared `prepared` (D elements) as the score uses it and
// returns |q| (cosine, each warp's warp_square_sum: the bits backward_keys_kernel gets
// for the same row; 0 otherwise).  Ends with the block synchronised.
template <ScoreKind kScore, int kVec, typename T>
__device__ __forceinline__ Acc<T> load_prepared_query(const DeviceProblem<T>& p, int64_t row, Acc<T>* prepared) {
  using A = Acc<T>;
  const T* query = p.query_row(row);
  for (int64_t d = threadIdx.x; d < p.score_dim; d += blockDim.x) {
    A q = to_acc(query[d]);
    if constexpr (kScore == ScoreKind::kAdditive) {
      if (p.bias != nullptr) q += to_acc(p.bias[d]);
    }
    prepared[d] = q;
  }
  A norm = A(0);
  if constexpr (kScore == ScoreKind::kCosine) {
    norm = sqrt(warp_square_sum<kVec>(query, p.score_dim));
    const A clamped = clamped_norm(norm, cosine_floor_of<T>());
    for (int64_t d = threadIdx.x; d < p.score_dim; d += blockDim.x) prepared[d] = prepared[d] / clamped;
  }
  __syncthreads();
  return norm;
}

}  // namespace cuda
}  // namespace fastattn
