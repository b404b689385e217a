// decoder_step.cu: one inference step of fastattn.nn.AttentionDecoderCell in ONE
// cooperative kernel launch, float32 / float16 / bfloat16 with float32 accumulation; the
// equations of csrc/decoder_step.cpp, in either order:
//   input feeding (Luong 2015)            Bahdanau (2015)
//   s_t = cell([y; h~_{t-1}], s_{t-1})    c_t = attention(s_{t-1})
//   c_t = attention(s_t)                  s_t = cell([y; c_t], s_{t-1})
//   h~_t = tanh(W_c [c_t; s_t])           h~_t = tanh(W_c [c_t; s_t])
// cell: LSTM or GRU, torch.nn gate order; attention(s): q = W_q s (or s without
// query_weight), additive v.tanh(q + bias + k'), dot scale * q.k or cosine
// scale * q.k / (|q| |k|) over K', V; local-p (window > 0): only keys j in
// [p - D, p + D] of p = S_b sigmoid(v_p . tanh(W_p s)), the weights (after the softmax)
// times exp(-(j - p)^2 / (2 (D / 2)^2)).
// Phases, separated by the grid barrier of grid_barrier.cuh where the data force it:
//   A  gates + cell: hidden unit j's 4 (LSTM) or 3 (GRU) gate rows of W_ih [y; h~ or
//      c_t] + W_hh h for a tile of batch rows staged in shared memory (c_t merged from
//      phase C's partials), by one warp (or by up to 8 warps of a block, each over a
//      share of K, when the units are fewer than the grid's warps: for_each_row), then
//      the cell pointwise (recurrent_cell_math.cuh) -> s_t, c_t.             barrier
//   B  (query_weight or local-p) q = W_q s and W_p s, their rows likewise.    barrier
//   C  attention partials: a block per (batch row, key split) takes the window's centre
//      (local-p), scores its keys (a warp per key inside the window and the row's
//      length; raw scores go to the scores scratch), softmax over the split, partial
//      context (times the Gaussian: the block's threads in groups over the values'
//      rows, 16-byte loads, kRowUnroll rows in flight a thread), max and sum. barrier
//   D  the weights from the raw scores; the combine: every block stages [c_t; s_t] of a
//      batch tile (merging the splits' partials), the rows of W_c likewise, tanh.
// Input feeding runs A B C D, Bahdanau B C A D: three grid barriers either way (two
// with neither query_weight nor a window).
// Every weight matrix is read once per batch tile (one tile up to 8 rows): at batch 1
// a step moves E * (G H (I + F + H) + (Dk + Dp) H + S (Dk + Dv) + H (Dv + H)) bytes of
// weights, keys and values (E bytes per element, G = 4 LSTM, 3 GRU, F = H or Dv what
// the cell is fed; a window reads only its keys), which is what bounds it.
// Staged tiles, queries, scores and partials are float32 whatever the element type;
// s_t is read back from h_next in the element type, as the composed step reads it.
// Loads: 16 bytes at a time when every size is a multiple of 16 / E and every row starts
// 16-byte aligned, one element at a time otherwise.
// Not handled (the binding composes the step instead): float64, local-m windows (a
// single step has no position t), and shapes whose batch-row tile (I + F + H or Dv + H
// floats) does not fit in shared memory.

#include "additive_tanh.cuh"
#include "grid_barrier.cuh"
#include "recurrent_cell_math.cuh"
#include "shared_memory_opt_in.h"

namespace fastattn {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxWarps = kThreads / kWarpSize;
constexpr int64_t kMaxBatchTile = 8;   // batch rows per staged tile (registers: 4 x 8 sums per lane)
constexpr int64_t kMaxSplits = 8;      // key splits per batch row (every block merges them: phases D, Bahdanau A)
constexpr int64_t kMinKeysPerSplit = 32;

__host__ __device__ constexpr int64_t round_up4(int64_t value) { return (value + 3) / 4 * 4; }
__host__ __device__ constexpr int64_t max_of(int64_t a, int64_t b) { return a > b ? a : b; }
__host__ __device__ constexpr int64_t min_of(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ constexpr int gates_of(RecurrentCell cell) { return cell == RecurrentCell::kLstm ? 4 : 3; }

// The width of what the cell reads besides y: h~_{t-1} (H, input feeding) or c_t (Dv).
__host__ __device__ inline int64_t fed_width(const DecoderStepProblem& p) {
  return p.input_feeding ? p.hidden : p.value_dim;
}

// Row lengths (floats) of the staged batch-row tiles: phase A [y; h~ or c_t; h], phase B
// the query state, phase D [c_t; s_t]; each padded to 4 for 16-byte reads.
struct StagedRows {
  int64_t gates, query, combine;
};
__host__ __device__ inline StagedRows staged_rows(const DecoderStepProblem& p) {
  return {round_up4(p.input_size + fed_width(p) + p.hidden), round_up4(p.hidden),
          round_up4(p.value_dim + p.hidden)};
}

// Phase C's values pass: RowGroups of a block's threads over rows of Dv, vec elements a
// thread (at most kMaxWarps groups), each group's partial context in shared memory.
__host__ __device__ inline RowGroups value_groups(int64_t value_dim, int vec, int threads) {
  return row_groups(value_dim, vec, threads, kMaxWarps);
}

// Shared floats: the warps' exchange of partial row sums (for_each_row), then the
// largest of a phase-A/B/D tile (plus its rows' MergedSplits, two floats a row) and phase C's
// query, split scores, reduction scratch and partial contexts (vec: the kernel's kVec).
constexpr int64_t kExchangeFloats = kMaxWarps * 4 * kMaxBatchTile;
int64_t shared_floats(const DecoderStepProblem& p, int64_t batch_tile, int64_t keys_per_split, int vec) {
  const StagedRows rows = staged_rows(p);
  const int64_t tiles = batch_tile * max_of(rows.gates, rows.combine) + 2 * batch_tile;
  const int64_t attention = round_up4(p.score_dim) + round_up4(keys_per_split) + kMaxWarps +
                            value_groups(p.value_dim, vec, kThreads).groups * p.value_dim;
  return kExchangeFloats + max_of(tiles, attention);
}

__device__ __forceinline__ float warp_max(float value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = nan_or_max(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

// Max (kMax) or sum over the block, every thread gets it; scratch >= warps floats.
template <bool kMax>
__device__ float block_reduce(float value, float* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  value = kMax ? warp_max(value) : warp_sum(value);
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  float total = kMax ? negative_infinity<float>() : 0.0f;
  for (int w = 0; w < static_cast<int>(blockDim.x) / kWarpSize; ++w) {
    total = kMax ? nan_or_max(total, scratch[w]) : total + scratch[w];
  }
  __syncthreads();
  return total;
}

// A warp's share of the products of one weight row with a tile of batch rows: the
// warp-wide chunks part, part + parts, ... of K.
struct RowShare {
  int part, parts;
};

// kVec floats of a staged tile, 16 bytes at a time when kVec is a multiple of 4 (the wide
// loads' tiles: strides, offsets and k multiples of 4 floats from a 16-byte aligned base).
template <int kVec>
__device__ __forceinline__ void load_staged(const float* source, float (&out)[kVec]) {
  if constexpr (kVec % 4 == 0) {
#pragma unroll
    for (int i = 0; i < kVec; i += 4) {
      expect_aligned(source + i, sizeof(float4));
      const float4 four = *reinterpret_cast<const float4*>(source + i);
      out[i] = four.x, out[i + 1] = four.y, out[i + 2] = four.z, out[i + 3] = four.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = source[i];
  }
}

// sums[r][bb] += weights[r] . tile[bb][offset : offset + length] for kRows weight rows
// (a cell's gates) over the warp's share of K, for the tile's `rows` batch rows,
// lane-partial (warp_sum them): weight rows in global memory, tile in shared memory
// (row stride `stride`), each staged element read once for all kRows rows: one row at a
// time, a tile of 8 batch rows reads 32 bytes of shared memory per weight element, 8x
// (float32) or 16x (16-bit) the weight's own bytes; kVec-wide loads (kVec > 1: 16 bytes,
// length a multiple of kVec and the rows 16-byte aligned).
template <int kVec, int kRows, typename T>
__device__ __forceinline__ void add_row_products(const T* const (&weights)[kRows], int64_t length, const float* tile,
                                                 int64_t stride, int64_t offset, int64_t rows, RowShare share,
                                                 float (&sums)[kRows][kMaxBatchTile]) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t step = static_cast<int64_t>(share.parts) * kWarpSize * kVec;
#pragma unroll(kRows > 1 ? 1 : 4)  // several row loads in flight per warp
  for (int64_t k = (static_cast<int64_t>(share.part) * kWarpSize + lane) * kVec; k < length; k += step) {
    float w[kRows][kVec];
#pragma unroll
    for (int r = 0; r < kRows; ++r) load_pack<kVec>(weights[r] + k, w[r]);
#pragma unroll
    for (int bb = 0; bb < kMaxBatchTile; ++bb) {
      if (bb >= rows) break;
      float x[kVec];
      load_staged<kVec>(tile + bb * stride + offset + k, x);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) sums[r][bb] += w[r][i] * x[i];
      }
    }
  }
}

template <int kGroups>
__device__ __forceinline__ void warp_sum_all(float (&sums)[kGroups][kMaxBatchTile]) {
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
#pragma unroll
    for (int bb = 0; bb < kMaxBatchTile; ++bb) sums[g][bb] = warp_sum(sums[g][bb]);
  }
}

__device__ __forceinline__ float value_or_zero(const float* values, int64_t index) {
  return values != nullptr ? values[index] : 0.0f;
}

// The problem's and the outputs' element pointers as T.
template <typename T>
__device__ __forceinline__ const T* as(const void* pointer) {
  return static_cast<const T*>(pointer);
}
template <typename T>
__device__ __forceinline__ T* as(void* pointer) {
  return static_cast<T*>(pointer);
}

// The state the query is made of (B, H): s_t (input feeding, phase A's output) or s_{t-1}.
template <typename T>
__device__ __forceinline__ const T* query_state(const DecoderStepProblem& p, const DecoderStepBuffers& out) {
  return p.input_feeding ? as<T>(out.h_next) : as<T>(p.h);
}

struct Tile {
  int64_t first, rows;
};
__device__ __forceinline__ Tile tile_of(const DecoderStepPlan& plan, int64_t batch, int64_t first) {
  return {first, min_of(plan.batch_tile, batch - first)};
}

__device__ __forceinline__ int64_t warps_in_grid() {
  return static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
}

// The warps of a block that share one row: the largest power of two, within the block,
// that keeps every warp of the grid busy on `rows` rows (more loads in flight when the
// rows are fewer than the warps: batch 1, H below the grid's warp count).
__device__ __forceinline__ int warps_per_row(int64_t rows) {
  const int warps = blockDim.x / kWarpSize;
  const int64_t spare = warps_in_grid() / max_of(rows, 1);
  int split = 1;
  while (2 * split <= spare && 2 * split <= warps && warps % (2 * split) == 0) split *= 2;
  return split;
}

// For every row r < rows, spread over the grid's warps (warps_per_row of a block per
// row, each over its share of K): products(r, share, sums) adds the warp's lane-partial
// sums of kGroups products; the row's sums are reduced over its lanes and warps (through
// `exchange`, kExchangeFloats) and finish(r, sums) runs on the row's first warp, every
// lane holding the totals.  Every thread of the block must call it (it synchronises the
// block twice per round when warps share rows).
template <int kGroups, typename Products, typename Finish>
__device__ void for_each_row(int64_t rows, float* exchange, Products&& products, Finish&& finish) {
  static_assert(kGroups * kMaxBatchTile * kMaxWarps <= kExchangeFloats, "exchange too small");
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int split = warps_per_row(rows), groups = static_cast<int>(blockDim.x / kWarpSize) / split;
  const RowShare share{warp % split, split};
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * groups; base < rows;
       base += static_cast<int64_t>(gridDim.x) * groups) {
    const int64_t row = base + warp / split;
    float sums[kGroups][kMaxBatchTile] = {};
    if (row < rows) products(row, share, sums);
    warp_sum_all(sums);
    if (split > 1) {
      float* mine = exchange + warp * kGroups * kMaxBatchTile;
      if (lane == 0) {
#pragma unroll
        for (int g = 0; g < kGroups; ++g) {
#pragma unroll
          for (int bb = 0; bb < kMaxBatchTile; ++bb) mine[g * kMaxBatchTile + bb] = sums[g][bb];
        }
      }
      __syncthreads();
      if (share.part == 0) {
        for (int other = 1; other < split; ++other) {
          const float* theirs = mine + other * kGroups * kMaxBatchTile;
#pragma unroll
          for (int g = 0; g < kGroups; ++g) {
#pragma unroll
            for (int bb = 0; bb < kMaxBatchTile; ++bb) sums[g][bb] += theirs[g * kMaxBatchTile + bb];
          }
        }
      }
      __syncthreads();
    }
    if (row < rows && share.part == 0) finish(row, sums);
  }
}

// Batch row b's softmax over its key splits (MergedSplits), from the partials phase C
// left; read past L1, other blocks wrote them in this launch.
__device__ __forceinline__ MergedSplits<float> merged_splits(const DecoderStepPlan& plan,
                                                             const DecoderStepBuffers& out, int64_t b) {
  const float* split_max = out.partial_max + b * plan.splits;
  const float* split_sum = out.partial_sum + b * plan.splits;
  return MergedSplits<float>(
      plan.splits, [&](int64_t s) { return __ldcg(split_max + s); }, [&](int64_t s) { return __ldcg(split_sum + s); });
}

// The merged splits of a batch tile's rows, into merged[0, tile.rows) for every thread of
// the block (it synchronises the block).
__device__ void stage_merged_splits(const DecoderStepPlan& plan, const DecoderStepBuffers& out, Tile tile,
                                    MergedSplits<float>* merged) {
  if (threadIdx.x < tile.rows) merged[threadIdx.x] = merged_splits(plan, out, tile.first + threadIdx.x);
  __syncthreads();
}

// Element k of batch row b's context c_t, from the splits' partial contexts (0 for a row
// with no visible key).
__device__ __forceinline__ float merged_context(const DecoderStepPlan& plan, const DecoderStepBuffers& out,
                                                int64_t value_dim, int64_t b, int64_t k,
                                                const MergedSplits<float>& merged) {
  float value = 0.0f;
  for (int64_t s = 0; s < plan.splits; ++s) {
    const int64_t slot = b * plan.splits + s;
    value += merged.context_factor(__ldcg(out.partial_max + slot)) * __ldcg(out.partial_context + slot * value_dim + k);
  }
  return value;
}

// Phase A for one batch tile: stage [y; h~_{t-1}; h] (input feeding) or [y; c_t; h]
// (Bahdanau: c_t merged from the splits), then each warp's hidden units.
template <typename T, RecurrentCell kCell, int kVec>
__device__ void gates_and_cell(const DecoderStepProblem& p, const DecoderStepPlan& plan,
                               const DecoderStepBuffers& out, Tile tile, float* exchange, float* staged) {
  const int64_t I = p.input_size, H = p.hidden, fed = I + fed_width(p), stride = staged_rows(p).gates;
  const T *y = as<T>(p.y), *attentional = as<T>(p.attentional), *h = as<T>(p.h), *c = as<T>(p.c);
  const T *w_ih = as<T>(p.w_ih), *w_hh = as<T>(p.w_hh);
  auto* merged = reinterpret_cast<MergedSplits<float>*>(staged + tile.rows * stride);
  if (!p.input_feeding) stage_merged_splits(plan, out, tile, merged);
  for (int64_t e = threadIdx.x; e < tile.rows * stride; e += blockDim.x) {
    const int64_t bb = e / stride, k = e % stride, b = tile.first + bb;
    float value = 0.0f;
    if (k < I) {
      value = to_acc(y[b * I + k]);
    } else if (k < fed) {
      value = p.input_feeding ? to_acc(attentional[b * H + k - I])
                              : merged_context(plan, out, p.value_dim, b, k - I, merged[bb]);
    } else if (k < fed + H) {
      value = to_acc(h[b * H + k - fed]);
    }
    staged[e] = value;
  }
  __syncthreads();
  const int lane = threadIdx.x % kWarpSize;
  // The sums of unit j: LSTM i, f, g, o; GRU r, z (input + hidden), n input side, n hidden side.
  constexpr int kGates = gates_of(kCell);
  auto products = [&](int64_t j, RowShare share, float (&sums)[4][kMaxBatchTile]) {
    const T* input_rows[kGates];
    const T* hidden_rows[kGates];
#pragma unroll
    for (int gate = 0; gate < kGates; ++gate) {
      input_rows[gate] = w_ih + (gate * H + j) * fed;
      hidden_rows[gate] = w_hh + (gate * H + j) * H;
    }
    if constexpr (kCell == RecurrentCell::kLstm) {
      add_row_products<kVec>(input_rows, fed, staged, stride, 0, tile.rows, share, sums);
      add_row_products<kVec>(hidden_rows, H, staged, stride, fed, tile.rows, share, sums);
    } else {
      float input[kGates][kMaxBatchTile] = {}, hidden[kGates][kMaxBatchTile] = {};
      add_row_products<kVec>(input_rows, fed, staged, stride, 0, tile.rows, share, input);
      add_row_products<kVec>(hidden_rows, H, staged, stride, fed, tile.rows, share, hidden);
#pragma unroll
      for (int bb = 0; bb < kMaxBatchTile; ++bb) {
        sums[0][bb] += input[0][bb] + hidden[0][bb];
        sums[1][bb] += input[1][bb] + hidden[1][bb];
        sums[2][bb] += input[2][bb];
        sums[3][bb] += hidden[2][bb];
      }
    }
  };
  auto cell = [&](int64_t j, float (&sums)[4][kMaxBatchTile]) {
    if (lane >= tile.rows) return;
    float part[4] = {};
#pragma unroll
    for (int bb = 0; bb < kMaxBatchTile; ++bb) {  // constant indices keep sums in registers
      if (bb == lane) {
#pragma unroll
        for (int g = 0; g < 4; ++g) part[g] = sums[g][bb];
      }
    }
    const int64_t b = tile.first + lane, index = b * H + j;
    auto input_bias = [&](int gate) { return value_or_zero(p.b_ih, gate * H + j); };
    auto hidden_bias = [&](int gate) { return value_or_zero(p.b_hh, gate * H + j); };
    if constexpr (kCell == RecurrentCell::kLstm) {
      auto pre = [&](int gate) { return part[gate] + input_bias(gate) + hidden_bias(gate); };
      const LstmForward<float> next = lstm_forward(pre(0), pre(1), pre(2), pre(3), to_acc(c[index]));
      as<T>(out.h_next)[index] = from_acc<T>(next.h);
      as<T>(out.c_next)[index] = from_acc<T>(next.c);
    } else {
      const GruForward<float> next =
          gru_forward(part[0] + input_bias(0), part[1] + input_bias(1), part[2] + input_bias(2), hidden_bias(0),
                      hidden_bias(1), part[3] + hidden_bias(2), to_acc(h[index]));
      as<T>(out.h_next)[index] = from_acc<T>(next.h);
    }
  };
  for_each_row<4>(H, exchange, products, cell);
  __syncthreads();  // the staged tile is free again
}

// Phase B for one batch tile: query[b][d] = W_q[d] . s[b] (with query_weight) and
// position[b][d] = W_p[d] . s[b] (local-p), s the query's state.
template <typename T, int kVec>
__device__ void project_state(const DecoderStepProblem& p, const DecoderStepBuffers& out, Tile tile, float* exchange,
                              float* staged) {
  const int64_t H = p.hidden, stride = staged_rows(p).query;
  const int64_t query_rows = p.query_weight != nullptr ? p.score_dim : 0;
  const int64_t position_rows = p.window > 0 ? p.position_dim : 0;
  const T* state = query_state<T>(p, out);
  for (int64_t e = threadIdx.x; e < tile.rows * stride; e += blockDim.x) {
    const int64_t bb = e / stride, k = e % stride;
    staged[e] = k < H ? to_acc(__ldcg(state + (tile.first + bb) * H + k)) : 0.0f;
  }
  __syncthreads();
  const int lane = threadIdx.x % kWarpSize;
  auto products = [&](int64_t d, RowShare share, float (&sums)[1][kMaxBatchTile]) {
    const T* row[1] = {d < query_rows ? as<T>(p.query_weight) + d * H
                                      : as<T>(p.position_weight) + (d - query_rows) * H};
    add_row_products<kVec>(row, H, staged, stride, 0, tile.rows, share, sums);
  };
  auto store = [&](int64_t d, float (&sums)[1][kMaxBatchTile]) {
    float* column = d < query_rows ? out.query + d : out.position + (d - query_rows);
    const int64_t width = d < query_rows ? p.score_dim : p.position_dim;
#pragma unroll
    for (int bb = 0; bb < kMaxBatchTile; ++bb) {
      if (bb == lane && bb < tile.rows) column[(tile.first + bb) * width] = sums[0][bb];
    }
  };
  for_each_row<1>(query_rows + position_rows, exchange, products, store);
  __syncthreads();
}

// Local-p: batch row b's window centre p = S_b sigmoid(v_p . tanh(W_p s)), S_b its
// length (or S), for every thread of the block (it synchronises the block; scratch:
// warps floats).
__device__ float window_center(const DecoderStepProblem& p, const DecoderStepBuffers& out, int64_t b,
                               float* scratch) {
  float sum = 0.0f;
  for (int64_t d = threadIdx.x; d < p.position_dim; d += blockDim.x) {
    sum += p.position_v[d] * tanhf(__ldcg(out.position + b * p.position_dim + d));
  }
  const float fraction = 1.0f / (1.0f + expf(-block_reduce<false>(sum, scratch)));
  return static_cast<float>(p.lengths != nullptr ? p.lengths[b] : p.source_length) * fraction;
}

// The keys batch row b may attend to before key_padding_mask (attention_math.h's
// key_range): j < lengths[b] (and S) and, local-p, p - D <= j <= p + D.
__device__ __forceinline__ KeyRange row_key_range(const DecoderStepProblem& p, int64_t b, float center) {
  const int64_t length = p.lengths != nullptr ? p.lengths[b] : p.source_length;
  return key_range(int64_t{0}, p.source_length, length, false, p.window > 0 ? p.window : -1, center);
}
__device__ __forceinline__ bool is_padding(const DecoderStepProblem& p, int64_t b, int64_t j) {
  return p.key_padding_mask != nullptr && p.key_padding_mask[b * p.source_length + j];
}

// Phase C for one (batch row, key split).
template <typename T, ScoreKind kScore, int kVec>
__device__ void attention_split(const DecoderStepProblem& p, const DecoderStepPlan& plan,
                                const DecoderStepBuffers& out, int64_t b, int64_t split, float* shared) {
  const int64_t D = p.score_dim, Dv = p.value_dim;
  float* query = shared;
  float* scores = query + round_up4(D);
  float* scratch = scores + round_up4(plan.keys_per_split);
  const T* state = query_state<T>(p, out) + b * p.hidden;  // q = the state without query_weight
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float q = p.query_weight != nullptr ? __ldcg(out.query + b * D + d) : to_acc(__ldcg(state + d));
    if constexpr (kScore == ScoreKind::kAdditive) q += value_or_zero(p.bias, d);
    query[d] = q;
  }
  if constexpr (kScore == ScoreKind::kCosine) {  // the unit query: q / max(|q|, floor)
    float squares = 0.0f;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) squares += query[d] * query[d];
    const float norm = clamped_norm(sqrtf(block_reduce<false>(squares, scratch)), cosine_floor_of<T>());
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) query[d] = query[d] / norm;
  }
  __syncthreads();
  const float center = p.window > 0 ? window_center(p, out, b, scratch) : 0.0f;
  if (p.window > 0 && split == 0 && threadIdx.x == 0) out.centers[b] = center;  // phase D's Gaussian
  const KeyRange visible = row_key_range(p, b, center);
  const int64_t first = split * plan.keys_per_split;
  const int64_t count = min_of(plan.keys_per_split, p.source_length - first);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, warps = blockDim.x / kWarpSize;
  for (int64_t key = warp; key < count; key += warps) {
    const int64_t j = first + key;
    float score = negative_infinity<float>();
    if (key_is_visible(visible, j, is_padding(p, b, j))) {
      const T* row = as<T>(p.keys) + b * p.keys_batch_stride + j * D;
      float sum = 0.0f, key_squares = 0.0f;
      for (int64_t d = static_cast<int64_t>(lane) * kVec; d < D; d += kWarpSize * kVec) {
        float k[kVec];
        load_pack<kVec>(row + d, k);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          if constexpr (kScore == ScoreKind::kAdditive) {
            sum += p.v[d + i] * additive_tanh<T, kVec>(query[d + i] + k[i], d, i);
          } else {
            sum += query[d + i] * k[i];
            if constexpr (kScore == ScoreKind::kCosine) key_squares += k[i] * k[i];
          }
        }
      }
      sum = warp_sum(sum);
      if constexpr (kScore == ScoreKind::kAdditive) {
        score = sum;
      } else if constexpr (kScore == ScoreKind::kCosine) {  // scale * unit_q . k / max(|k|, floor)
        score = p.scale * (sum / clamped_norm(sqrtf(warp_sum(key_squares)), cosine_floor_of<T>()));
      } else {
        score = sum * p.scale;
      }
    }
    if (lane == 0) {
      scores[key] = score;
      out.scores[b * p.source_length + j] = score;  // the weights of phase D
    }
  }
  __syncthreads();
  float local_max = negative_infinity<float>();
  for (int64_t key = threadIdx.x; key < count; key += blockDim.x) local_max = nan_or_max(local_max, scores[key]);
  const float split_max = block_reduce<true>(local_max, scratch);
  float local_sum = 0.0f;
  for (int64_t key = threadIdx.x; key < count; key += blockDim.x) {
    const float probability = split_max == negative_infinity<float>() ? 0.0f : exp_of(scores[key] - split_max);
    scores[key] = probability;
    local_sum += probability;
  }
  const float split_sum = block_reduce<false>(local_sum, scratch);  // also publishes the probabilities
  if (p.window > 0) {  // the context weighs the values by probability times Gaussian
    for (int64_t key = threadIdx.x; key < count; key += blockDim.x) {
      scores[key] *= gaussian_factor(first + key, center, p.window);
    }
    __syncthreads();
  }
  const int64_t slot = b * plan.splits + split;
  const T* values = as<T>(p.values) + b * p.values_batch_stride + first * Dv;
  // Keys outside the row's visible range have probability 0: their values are not read.
  const int begin = static_cast<int>(min_of(max_of(visible.begin - first, 0), count));
  const int end = static_cast<int>(max_of(min_of(visible.end - first, count), begin));
  // The probability-weighted values: each group of threads adds every groups-th key's row
  // with kRowUnroll rows' 16-byte loads in flight a thread (one scalar load a thread and
  // key took this pass from memory latency at every batch size); the groups' partial
  // contexts then meet in shared memory in a fixed order.
  const RowGroups groups = value_groups(Dv, kVec, blockDim.x);
  const int group = threadIdx.x / groups.lanes, group_lane = threadIdx.x % groups.lanes;
  float* partials = scratch + kMaxWarps;  // groups x Dv
  if (group < groups.groups) {
    for (int64_t d = static_cast<int64_t>(group_lane) * kVec; d < Dv; d += static_cast<int64_t>(groups.lanes) * kVec) {
      float sum[kVec] = {};
      add_rows_in_turn<kVec, float>(
          begin + group, groups.groups, end, [&](int key, float(&row)[kVec]) { load_pack<kVec>(values + key * Dv + d, row); },
          [&](int key, const float(&row)[kVec]) { add_weighted<kVec>(scores[key], row, sum); });
#pragma unroll
      for (int i = 0; i < kVec; ++i) partials[group * Dv + d + i] = sum[i];
    }
  }
  __syncthreads();
  for (int64_t d = threadIdx.x; d < Dv; d += blockDim.x) {
    float context = 0.0f;
    for (int g = 0; g < groups.groups; ++g) context += partials[g * Dv + d];
    out.partial_context[slot * Dv + d] = context;
  }
  if (threadIdx.x == 0) {
    out.partial_max[slot] = split_max;
    out.partial_sum[slot] = split_sum;
  }
  __syncthreads();
}

// Phase D, first part: weights = exp(score - max) / sum (0 for masked keys and for a row
// with no visible key), local-p times the Gaussian.
template <typename T>
__device__ void normalise_weights(const DecoderStepProblem& p, const DecoderStepPlan& plan,
                                  const DecoderStepBuffers& out) {
  const int64_t S = p.source_length, total = p.batch * S;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float weight = merged_splits(plan, out, e / S).weight(__ldcg(out.scores + e));
    if (p.window > 0 && weight != 0.0f) weight *= gaussian_factor(e % S, __ldcg(out.centers + e / S), p.window);
    as<T>(out.weights)[e] = from_acc<T>(weight);
  }
}

// Phase D, the combine for one batch tile: stage [c_t; s_t] (merging the splits), then
// output[b][r] = tanh(W_c[r] . [c_t; s_t]).
template <typename T, int kVec>
__device__ void combine(const DecoderStepProblem& p, const DecoderStepPlan& plan, const DecoderStepBuffers& out,
                        Tile tile, float* exchange, float* staged) {
  const int64_t H = p.hidden, Dv = p.value_dim, stride = staged_rows(p).combine;
  const T* h_next = as<T>(out.h_next);
  auto* merged = reinterpret_cast<MergedSplits<float>*>(staged + tile.rows * stride);
  stage_merged_splits(plan, out, tile, merged);
  for (int64_t e = threadIdx.x; e < tile.rows * stride; e += blockDim.x) {
    const int64_t bb = e / stride, k = e % stride, b = tile.first + bb;
    float value = 0.0f;
    if (k < Dv) {
      value = merged_context(plan, out, Dv, b, k, merged[bb]);
    } else if (k < Dv + H) {
      value = to_acc(__ldcg(h_next + b * H + k - Dv));
    }
    staged[e] = value;
  }
  __syncthreads();
  const int lane = threadIdx.x % kWarpSize;
  auto products = [&](int64_t r, RowShare share, float (&sums)[1][kMaxBatchTile]) {
    const T* row[1] = {as<T>(p.w_combine) + r * (Dv + H)};
    add_row_products<kVec>(row, Dv + H, staged, stride, 0, tile.rows, share, sums);
  };
  auto store = [&](int64_t r, float (&sums)[1][kMaxBatchTile]) {
#pragma unroll
    for (int bb = 0; bb < kMaxBatchTile; ++bb) {
      if (bb == lane && bb < tile.rows) as<T>(out.output)[(tile.first + bb) * H + r] = from_acc<T>(tanhf(sums[0][bb]));
    }
  };
  for_each_row<1>(H, exchange, products, store);
  __syncthreads();
}

template <typename T, RecurrentCell kCell, ScoreKind kScore, int kVec>
__global__ void __launch_bounds__(kThreads, 1)
    decoder_step_kernel(DecoderStepProblem p, DecoderStepPlan plan, DecoderStepBuffers out) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  float* exchange = reinterpret_cast<float*>(shared_bytes);
  float* shared = exchange + kExchangeFloats;
  const int64_t B = p.batch;
  unsigned long long barriers = 0;
  auto barrier = [&] { grid_barrier(out.barrier, ++barriers * gridDim.x); };
  auto cell_step = [&] {
    for (int64_t first = 0; first < B; first += plan.batch_tile) {
      gates_and_cell<T, kCell, kVec>(p, plan, out, tile_of(plan, B, first), exchange, shared);
    }
    barrier();
  };
  if (p.input_feeding) cell_step();  // s_t first: the query is made of it
  if (p.query_weight != nullptr || p.window > 0) {
    for (int64_t first = 0; first < B; first += plan.batch_tile) {
      project_state<T, kVec>(p, out, tile_of(plan, B, first), exchange, shared);
    }
    barrier();
  }
  for (int64_t item = blockIdx.x; item < B * plan.splits; item += gridDim.x) {
    attention_split<T, kScore, kVec>(p, plan, out, item / plan.splits, item % plan.splits, shared);
  }
  barrier();
  if (!p.input_feeding) cell_step();  // Bahdanau: the cell reads c_t
  for (int64_t first = 0; first < B; first += plan.batch_tile) {
    combine<T, kVec>(p, plan, out, tile_of(plan, B, first), exchange, shared);
  }
  normalise_weights<T>(p, plan, out);
}

// Elements per 16-byte load of `dtype`; 0 for a dtype the kernel does not take.
int64_t wide_vec(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return 4;
    case DType::kFloat16:
    case DType::kBFloat16:
      return 8;
    default:
      return 0;
  }
}

// The sizes let every row read with 16-byte loads start on a multiple of 16 bytes.
bool sizes_fit_wide_loads(const DecoderStepProblem& p) {
  const int64_t vec = wide_vec(p.dtype);
  return vec > 0 && p.input_size % vec == 0 && p.hidden % vec == 0 && p.score_dim % vec == 0 &&
         p.value_dim % vec == 0 && p.keys_batch_stride % vec == 0 && p.values_batch_stride % vec == 0;
}

// 16-byte loads when, besides, every such row's tensor starts 16-byte aligned.
bool wide_loads_fit(const DecoderStepProblem& p) {
  return sizes_fit_wide_loads(p) && aligned16(p.keys) && aligned16(p.values) && aligned16(p.w_ih) && aligned16(p.w_hh) &&
         (p.query_weight == nullptr || aligned16(p.query_weight)) && aligned16(p.w_combine) &&
         (p.window == 0 || aligned16(p.position_weight));
}

template <typename T, int kVec, RecurrentCell kCell, typename Body>
cudaError_t with_score(const DecoderStepProblem& p, Body& body) {
  switch (p.score) {
    case ScoreKind::kAdditive:
      return body(decoder_step_kernel<T, kCell, ScoreKind::kAdditive, kVec>);
    case ScoreKind::kCosine:
      return body(decoder_step_kernel<T, kCell, ScoreKind::kCosine, kVec>);
    case ScoreKind::kDot:
      return body(decoder_step_kernel<T, kCell, ScoreKind::kDot, kVec>);
  }
  return cudaErrorInvalidValue;
}

template <typename T, int kVec, typename Body>
cudaError_t with_cell(const DecoderStepProblem& p, Body& body) {
  return p.cell == RecurrentCell::kLstm ? with_score<T, kVec, RecurrentCell::kLstm>(p, body)
                                        : with_score<T, kVec, RecurrentCell::kGru>(p, body);
}

// body(kernel) with the kernel of p's dtype, cell and score; `wide`: 16-byte loads.
template <typename Body>
cudaError_t with_kernel(const DecoderStepProblem& p, bool wide, Body&& body) {
  switch (p.dtype) {
    case DType::kFloat32:
      return wide ? with_cell<float, kWideVec<float>>(p, body) : with_cell<float, 1>(p, body);
    case DType::kFloat16:
      return wide ? with_cell<__half, kWideVec<__half>>(p, body) : with_cell<__half, 1>(p, body);
    case DType::kBFloat16:
      return wide ? with_cell<__nv_bfloat16, kWideVec<__nv_bfloat16>>(p, body) : with_cell<__nv_bfloat16, 1>(p, body);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

DecoderStepPlan decoder_step_plan(const DecoderStepProblem& p, int multiprocessors, int64_t shared_bytes_per_block) {
  DecoderStepPlan plan;
  const bool covered = (p.score == ScoreKind::kAdditive || p.score == ScoreKind::kDot ||
                        p.score == ScoreKind::kCosine) && wide_vec(p.dtype) > 0 && p.window >= 0 &&
                       (p.window == 0 || p.position_dim >= 1);
  if (!covered || p.batch < 1 || p.hidden < 1 || multiprocessors < 1 || p.source_length < 0) return plan;
  const int64_t keys_per_split = max_of(
      max_of(kMinKeysPerSplit, (p.source_length * p.batch + multiprocessors - 1) / multiprocessors),
      (p.source_length + kMaxSplits - 1) / kMaxSplits);
  const StagedRows rows = staged_rows(p);
  const int64_t floats = shared_bytes_per_block / static_cast<int64_t>(sizeof(float));
  const int64_t batch_tile = min_of(min_of(p.batch, kMaxBatchTile), floats / (max_of(rows.gates, rows.combine) + 2));
  if (batch_tile < 1) return plan;
  const int vec = wide_loads_fit(p) ? static_cast<int>(wide_vec(p.dtype)) : 1;  // with_kernel's choice
  const int64_t shared_bytes = static_cast<int64_t>(
      whole_shared_vectors(static_cast<size_t>(shared_floats(p, batch_tile, keys_per_split, vec)) * sizeof(float)));
  if (shared_bytes > shared_bytes_per_block) return plan;
  plan.blocks = multiprocessors;
  plan.threads = kThreads;
  plan.batch_tile = batch_tile;
  plan.keys_per_split = keys_per_split;
  plan.splits = p.source_length == 0 ? 1 : (p.source_length + keys_per_split - 1) / keys_per_split;
  plan.shared_bytes = shared_bytes;
  return plan;
}

cudaError_t decoder_step_plan_on_device(const DecoderStepProblem& p, DecoderStepPlan* plan) {
  *plan = DecoderStepPlan{};
  CooperativeDevice device;
  const cudaError_t status = query_cooperative_device(&device);
  if (status != cudaSuccess || device.cooperative == 0) return status;
  const DecoderStepPlan candidate = decoder_step_plan(p, device.multiprocessors, device.shared_optin);
  if (candidate.blocks == 0) return cudaSuccess;
  return with_kernel(p, wide_loads_fit(p), [&](auto kernel) -> cudaError_t {
    int per_multiprocessor = 0;
    const cudaError_t result =
        resident_blocks_per_multiprocessor(kernel, candidate.threads, candidate.shared_bytes, &per_multiprocessor);
    if (result == cudaSuccess && per_multiprocessor >= 1) *plan = candidate;
    return result;
  });
}

cudaError_t launch_decoder_step(const DecoderStepProblem& p, const DecoderStepPlan& plan,
                                const DecoderStepBuffers& buffers, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  const bool lstm = p.cell == RecurrentCell::kLstm;
  if (plan.blocks < 1 || plan.threads < kWarpSize || plan.threads > kThreads || plan.threads % kWarpSize != 0 ||
      plan.batch_tile < 1 || plan.batch_tile > kMaxBatchTile || plan.splits < 1 ||
      plan.splits * plan.keys_per_split < p.source_length || buffers.barrier == nullptr ||
      (buffers.scores == nullptr && p.source_length > 0) ||  // an empty source has no scores (nor their pointer)
      (lstm && (p.c == nullptr || buffers.c_next == nullptr)) ||
      (p.query_weight != nullptr && buffers.query == nullptr) ||
      (p.query_weight == nullptr && p.score_dim != p.hidden) || (p.score == ScoreKind::kAdditive && p.v == nullptr) ||
      p.window < 0 ||
      (p.window > 0 && (p.position_dim < 1 || p.position_weight == nullptr || p.position_v == nullptr ||
                        buffers.position == nullptr || buffers.centers == nullptr))) {
    return cudaErrorInvalidValue;
  }
  return with_kernel(p, wide_loads_fit(p), [&](auto kernel) -> cudaError_t {
    const cudaError_t status = opt_in_shared_bytes(kernel, static_cast<size_t>(plan.shared_bytes));
    if (status != cudaSuccess) return status;
    DecoderStepProblem problem = p;
    DecoderStepPlan launch_plan = plan;
    DecoderStepBuffers out = buffers;
    void* arguments[] = {&problem, &launch_plan, &out};
    return cudaLaunchCooperativeKernel(kernel, dim3(plan.blocks), dim3(plan.threads), arguments,
                                       static_cast<size_t>(plan.shared_bytes), stream);
  });
}

}  // namespace cuda
}  // namespace fastattn
