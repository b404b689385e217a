// persistent_recurrent.cu: the recurrent loop of a whole LSTM / GRU layer (one
// direction), forward and backward (BPTT), in ONE persistent kernel launch per call,
// float32 with float32 accumulation (the binding computes float16 / bfloat16 in float32
// and sends float64 to the per-step path).
//
// Each block owns `units_per_block` consecutive hidden units and keeps the W_hh entries
// of them in shared memory for the whole sequence: forward, the gate rows of its units
// (all gates), backward, the columns of its units.  Per time step a block computes its
// slice of h_{t-1} W_hh^T (forward) or of grad_gates_t W_hh (backward) from the full
// matrix in global memory (read at L2 with __ldcg: written by other blocks), applies the
// fused pointwise (recurrent_cell_math.cuh) to its units, writes them, and waits at a
// grid-wide barrier.  The forward ping-pongs h between two (B, H) buffers, so one
// barrier per step suffices; the backward writes every step's gate gradients to their
// own (T, B, G) slot.  Layouts, `saved` and lengths semantics are those of the per-step
// path (recurrent_pointwise.cu, csrc/cpu/recurrent.cpp).
//
// Grid barrier: our own arrival counter (atomicAdd + spin on a volatile load, fenced),
// launched with cudaLaunchCooperativeKernel.  The cooperative launch guarantees that all
// blocks are co-resident (it fails with cudaErrorCooperativeLaunchTooLarge instead of
// deadlocking), and the plan asks for at most one block per SM after an occupancy check.
// The barrier is ours rather than cooperative_groups' grid.sync() so that this file
// needs only the runtime headers and runs under the CPU emulation (csrc/cuda/emulation).
//
// The block GEMM: batch rows in passes of 64, K in chunks of 32 through two shared-memory
// stage buffers (the next chunk's L2 loads overlap the current chunk's FMAs), each thread
// a 4 x 4 register tile (float4 loads), fp32 FMAs (no tensor cores).  Not
// handled: float64, float16 / bfloat16 natively, LSTM projections (proj_size), shapes
// whose W_hh slice does not fit in shared memory (the plan says so; the binding falls
// back to per-step GEMMs + recurrent_pointwise.cu).
#include "grid_barrier.cuh"
#include "recurrent_cell_math.cuh"

namespace fastattn {
namespace cuda {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kMinThreads = 64;
constexpr int kTile = 4;               // a thread's register tile: kTile batch rows x kTile columns
constexpr int kMaxTilesPerThread = 2;
constexpr int kPassRows = 64;          // batch rows per GEMM pass
constexpr int kChunk = 32;             // K per staged chunk
constexpr int kStageStride = kPassRows + kTile;  // stage row length (padding against bank conflicts)
constexpr int kStageElements = kChunk * kPassRows;
constexpr int kStageFloats = kChunk * kStageStride;  // one of the two stage buffers
constexpr int kMaxPrefetch = kStageElements / kMinThreads;  // a thread's share of the next chunk

__host__ __device__ constexpr int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}
__host__ __device__ constexpr int gates_of(RecurrentCell cell) { return cell == RecurrentCell::kLstm ? 4 : 3; }

// The GEMM's shape in a block: K (depth, padded to kChunk) and the owned output columns
// (padded to kTile).  Forward: K = H, columns = gate rows of the owned units (gate-major:
// column gate * U + u).  Backward: K = gates * H, columns = the owned units.
struct BlockGemmShape {
  int64_t depth, padded_depth, columns;
};
__host__ __device__ inline BlockGemmShape block_gemm_shape(RecurrentCell cell, bool backward, int64_t hidden,
                                                           int64_t units) {
  const int64_t depth = backward ? gates_of(cell) * hidden : hidden;
  return {depth, round_up(depth, kChunk), round_up(backward ? units : gates_of(cell) * units, kTile)};
}

int64_t shared_bytes_for(const BlockGemmShape& shape) {
  const int64_t floats = shape.padded_depth * shape.columns + 2 * kStageFloats + kPassRows * shape.columns;
  return floats * static_cast<int64_t>(sizeof(float));
}

__device__ __forceinline__ bool is_active(const int64_t* lengths, int64_t t, int64_t b) {
  return lengths == nullptr || t < lengths[b];
}

__device__ __forceinline__ float bias_at(const float* bias, int64_t index) {
  return bias != nullptr ? bias[index] : 0.0f;
}

// out[b][c] = sum_k a[b][k] * weights[k][c] for the `rows` (<= kPassRows) rows of `a`
// (row stride lda, k < depth, read at L2), weights (padded_depth x columns) in shared
// memory with zero padding; out (kPassRows x columns) in shared memory.  K goes in chunks
// through two stage buffers ([k][b]): the next chunk's loads are in flight (registers)
// while the current one is multiplied.  Every thread of the block must call it; it
// synchronises the block once per chunk and at the end.
__device__ void block_gemm(const float* a, int64_t lda, int64_t rows, const BlockGemmShape& shape,
                           const float* weights, float* stage, float* out) {
  const int64_t columns = shape.columns, column_tiles = columns / kTile;
  const int64_t tiles = (rows + kTile - 1) / kTile * column_tiles;
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
  float accumulator[kMaxTilesPerThread][kTile][kTile] = {};
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
      const int64_t row0 = tile / column_tiles * kTile, column0 = tile % column_tiles * kTile;
#pragma unroll 4
      for (int kk = 0; kk < kChunk; ++kk) {
        const float4 h = *reinterpret_cast<const float4*>(current + kk * kStageStride + row0);
        const float4 w = *reinterpret_cast<const float4*>(weights + (k0 + kk) * columns + column0);
        const float hs[kTile] = {h.x, h.y, h.z, h.w}, ws[kTile] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int r = 0; r < kTile; ++r) {
#pragma unroll
          for (int c = 0; c < kTile; ++c) accumulator[i][r][c] += hs[r] * ws[c];
        }
      }
    }
  }
  // out is free: its last readers (the caller's pointwise) passed the loop's syncs.
#pragma unroll
  for (int i = 0; i < kMaxTilesPerThread; ++i) {
    const int64_t tile = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
    if (tile >= tiles) break;
    const int64_t row0 = tile / column_tiles * kTile, column0 = tile % column_tiles * kTile;
#pragma unroll
    for (int r = 0; r < kTile; ++r) {
#pragma unroll
      for (int c = 0; c < kTile; ++c) out[(row0 + r) * columns + column0 + c] = accumulator[i][r][c];
    }
  }
  __syncthreads();
}

// The block's units [first_unit, first_unit + units) and the shared-memory carve-up.
struct BlockSlice {
  int64_t first_unit, units, units_per_block;
  BlockGemmShape shape;
  float* weights;
  float* stage;
  float* out;
};

__device__ BlockSlice block_slice(RecurrentCell cell, bool backward, const PersistentLayer& layer,
                                  const PersistentPlan& plan, unsigned char* shared) {
  BlockSlice slice;
  slice.units_per_block = plan.units_per_block;
  slice.first_unit = static_cast<int64_t>(blockIdx.x) * plan.units_per_block;
  const int64_t left = layer.hidden - slice.first_unit;
  slice.units = left < plan.units_per_block ? left : plan.units_per_block;
  slice.shape = block_gemm_shape(cell, backward, layer.hidden, plan.units_per_block);
  slice.weights = reinterpret_cast<float*>(shared);
  slice.stage = slice.weights + slice.shape.padded_depth * slice.shape.columns;
  slice.out = slice.stage + 2 * kStageFloats;
  return slice;
}

// weights[k][column] of the slice, zero where padded.  Forward: W_hh[gate * H + unit][k]
// at column gate * U + u; backward: W_hh[k][unit] at column u.
__device__ void load_weights(RecurrentCell cell, bool backward, const PersistentLayer& layer, const BlockSlice& s) {
  const int64_t H = layer.hidden, U = s.units_per_block, columns = s.shape.columns;
  const int64_t total = s.shape.padded_depth * columns;
  for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
    float value = 0.0f;
    int64_t k, column;
    if (backward) {  // consecutive threads: consecutive units of one W_hh row
      k = e / columns;
      column = e % columns;
      if (k < s.shape.depth && column < s.units) value = layer.w_hh[k * H + s.first_unit + column];
    } else {  // consecutive threads: consecutive k of one W_hh row
      column = e / s.shape.padded_depth;
      k = e % s.shape.padded_depth;
      const int64_t gate = column / U, u = column % U;
      if (k < H && gate < gates_of(cell) && u < s.units) value = layer.w_hh[(gate * H + s.first_unit + u) * H + k];
    }
    s.weights[k * columns + column] = value;
  }
}

__device__ __forceinline__ int64_t time_of_step(const PersistentLayer& layer, int64_t s) {
  return layer.reverse ? layer.steps - 1 - s : s;
}

template <RecurrentCell kCell>
__global__ void __launch_bounds__(kMaxThreads, 1)
    persistent_forward_kernel(PersistentLayer layer, PersistentPlan plan, PersistentForwardBuffers buffers) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  constexpr bool kLstm = kCell == RecurrentCell::kLstm;
  constexpr int kGates = gates_of(kCell);
  const BlockSlice slice = block_slice(kCell, false, layer, plan, shared_bytes);
  load_weights(kCell, false, layer, slice);
  const int64_t T = layer.steps, B = layer.batch, H = layer.hidden, U = slice.units_per_block;
  const int64_t G = kGates * H, width = kLstm ? G + H : 4 * H, columns = slice.shape.columns;
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = time_of_step(layer, s);
    const float* h_prev = s % 2 == 0 ? buffers.h_state : buffers.h_scratch;
    float* h_next = s % 2 == 0 ? buffers.h_scratch : buffers.h_state;
    for (int64_t b0 = 0; b0 < B; b0 += kPassRows) {
      const int64_t rows = B - b0 < kPassRows ? B - b0 : kPassRows;
      block_gemm(h_prev + b0 * H, H, rows, slice.shape, slice.weights, slice.stage, slice.out);
      for (int64_t e = threadIdx.x; e < rows * slice.units; e += blockDim.x) {
        const int64_t row = e / slice.units, u = e % slice.units;
        const int64_t b = b0 + row, j = slice.first_unit + u, index = b * H + j;
        float* saved = buffers.saved + (t * B + b) * width;
        const float h = __ldcg(h_prev + index);
        float* output = buffers.output + t * B * H + index;
        if (!is_active(layer.lengths, t, b)) {  // finished sequence: state kept, output 0
          for (int k = 0; k < 4; ++k) saved[k * H + j] = 0.0f;
          if (kLstm) saved[G + j] = buffers.c_state[index];
          *output = 0.0f;
          h_next[index] = h;
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
          h_next[index] = *output = next.h;
        } else {
          const GruForward<float> next = gru_forward(input_part(0), input_part(1), input_part(2), hidden_part(0),
                                                     hidden_part(1), hidden_part(2), h);
          saved[j] = next.r;
          saved[H + j] = next.z;
          saved[2 * H + j] = next.n;
          saved[3 * H + j] = next.hidden_n;
          h_next[index] = *output = next.h;
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

// Backward of one step t for element (b, j): the gate gradients of step t (0 for an
// inactive row) from grad_h (the gradient reaching h_t, without grad_output).
template <RecurrentCell kCell>
__device__ __forceinline__ void step_backward(const PersistentLayer& layer, const PersistentBackwardBuffers& buffers,
                                              int64_t s, int64_t t, int64_t b, int64_t j) {
  const int64_t B = layer.batch, H = layer.hidden, index = b * H + j;
  if constexpr (kCell == RecurrentCell::kLstm) {
    const int64_t G = 4 * H, width = 5 * H;
    float* grad_row = buffers.grad_gates + (t * B + b) * G;
    if (!is_active(layer.lengths, t, b)) {
      for (int k = 0; k < 4; ++k) grad_row[k * H + j] = 0.0f;
      return;
    }
    const float* row = buffers.saved + (t * B + b) * width;
    const int64_t t_prev = layer.reverse ? t + 1 : t - 1;
    const float c_prev = s > 0 ? buffers.saved[(t_prev * B + b) * width + G + j] : buffers.c0[index];
    const float dh = buffers.grad_h[index] + buffers.grad_output[t * B * H + index];
    const LstmBackward<float> grad =
        lstm_backward(row[j], row[H + j], row[2 * H + j], row[3 * H + j], c_prev, row[G + j], dh, buffers.grad_c[index]);
    buffers.grad_c[index] = grad.grad_c_prev;
    grad_row[j] = grad.d_i;
    grad_row[H + j] = grad.d_f;
    grad_row[2 * H + j] = grad.d_g;
    grad_row[3 * H + j] = grad.d_o;
  } else {
    const int64_t G = 3 * H;
    float* input_row = buffers.grad_input_gates + (t * B + b) * G;
    float* hidden_row = buffers.grad_gates + (t * B + b) * G;
    if (!is_active(layer.lengths, t, b)) {
      for (int k = 0; k < 3; ++k) input_row[k * H + j] = hidden_row[k * H + j] = 0.0f;
      return;
    }
    const float* row = buffers.saved + (t * B + b) * 4 * H;
    const float r = row[j];
    const float dh = buffers.grad_h[index] + buffers.grad_output[t * B * H + index];
    const GruBackward<float> grad =
        gru_backward(r, row[H + j], row[2 * H + j], row[3 * H + j], buffers.previous_h[t * B * H + index], dh);
    input_row[j] = hidden_row[j] = grad.d_r;
    input_row[H + j] = hidden_row[H + j] = grad.d_z;
    input_row[2 * H + j] = grad.d_n;
    hidden_row[2 * H + j] = grad.d_n * r;
    buffers.direct[index] = grad.direct;
  }
}

// grad_h of the block's units for the rows active at step t: the recurrent gradient
// (grad_gates_t W_hh, in out) plus, for the GRU, the direct dh' * z; others keep grad_h.
template <RecurrentCell kCell>
__device__ __forceinline__ void take_recurrent(const PersistentLayer& layer, const PersistentBackwardBuffers& buffers,
                                               const BlockSlice& slice, int64_t t, int64_t row, int64_t b, int64_t u) {
  if (!is_active(layer.lengths, t, b)) return;
  const int64_t index = b * layer.hidden + slice.first_unit + u;
  const float recurrent = slice.out[row * slice.shape.columns + u];
  buffers.grad_h[index] = kCell == RecurrentCell::kGru ? recurrent + buffers.direct[index] : recurrent;
}

template <RecurrentCell kCell>
__global__ void __launch_bounds__(kMaxThreads, 1)
    persistent_backward_kernel(PersistentLayer layer, PersistentPlan plan, PersistentBackwardBuffers buffers) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const BlockSlice slice = block_slice(kCell, true, layer, plan, shared_bytes);
  load_weights(kCell, true, layer, slice);
  const int64_t T = layer.steps, B = layer.batch, H = layer.hidden, G = gates_of(kCell) * H;
  for (int64_t s = T - 1; s >= -1; --s) {  // s = -1: only the gradient reaching h0
    const int64_t t = s >= 0 ? time_of_step(layer, s) : -1;
    const int64_t t_next = time_of_step(layer, s + 1);  // the step whose gate gradients flow into h_t
    for (int64_t b0 = 0; b0 < B; b0 += kPassRows) {
      const int64_t rows = B - b0 < kPassRows ? B - b0 : kPassRows;
      const bool has_next = s < T - 1;
      if (has_next) {
        block_gemm(buffers.grad_gates + (t_next * B + b0) * G, G, rows, slice.shape, slice.weights, slice.stage,
                   slice.out);
      }
      for (int64_t e = threadIdx.x; e < rows * slice.units; e += blockDim.x) {
        const int64_t row = e / slice.units, u = e % slice.units, b = b0 + row;
        if (has_next) take_recurrent<kCell>(layer, buffers, slice, t_next, row, b, u);
        if (s >= 0) step_backward<kCell>(layer, buffers, s, t, b, slice.first_unit + u);
      }
    }
    if (s >= 0) grid_barrier(layer.barrier, static_cast<unsigned long long>(T - s) * gridDim.x);
  }
}

template <typename Buffers>
cudaError_t launch_cooperative(void (*kernel)(PersistentLayer, PersistentPlan, Buffers), PersistentLayer layer,
                               PersistentPlan plan, Buffers buffers, cudaStream_t stream) {
  if (layer.steps == 0 || layer.batch == 0 || layer.hidden == 0) return cudaSuccess;
  if (plan.blocks < 1 || plan.threads < 1 || plan.blocks * plan.units_per_block < layer.hidden ||
      layer.barrier == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (plan.shared_bytes > 48 * 1024) {
    const cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.shared_bytes));
    if (status != cudaSuccess) return status;
  }
  void* arguments[] = {&layer, &plan, &buffers};
  return cudaLaunchCooperativeKernel(kernel, dim3(plan.blocks), dim3(plan.threads), arguments,
                                     static_cast<size_t>(plan.shared_bytes), stream);
}

template <typename Body>
cudaError_t with_kernel(RecurrentCell cell, bool backward, Body&& body) {
  if (backward) {
    return cell == RecurrentCell::kLstm ? body(persistent_backward_kernel<RecurrentCell::kLstm>)
                                        : body(persistent_backward_kernel<RecurrentCell::kGru>);
  }
  return cell == RecurrentCell::kLstm ? body(persistent_forward_kernel<RecurrentCell::kLstm>)
                                      : body(persistent_forward_kernel<RecurrentCell::kGru>);
}

}  // namespace

PersistentPlan persistent_recurrent_plan(RecurrentCell cell, bool backward, int64_t batch, int64_t hidden,
                                         int multiprocessors, int64_t shared_bytes_per_block) {
  PersistentPlan plan;
  if (batch < 1 || hidden < 1 || multiprocessors < 1) return plan;
  const int64_t units = (hidden + multiprocessors - 1) / multiprocessors;
  const BlockGemmShape shape = block_gemm_shape(cell, backward, hidden, units);
  const int64_t column_tiles = shape.columns / kTile;
  const int64_t shared = shared_bytes_for(shape);
  if (kPassRows / kTile * column_tiles > kMaxThreads * kMaxTilesPerThread || shared > shared_bytes_per_block) {
    return plan;
  }
  const int64_t row_tiles = ((batch < kPassRows ? batch : kPassRows) + kTile - 1) / kTile;
  const int64_t threads = round_up(row_tiles * column_tiles, kMinThreads);
  plan.blocks = static_cast<int>((hidden + units - 1) / units);
  plan.threads = static_cast<int>(threads < kMaxThreads ? threads : kMaxThreads);
  plan.units_per_block = units;
  plan.shared_bytes = shared;
  return plan;
}

cudaError_t persistent_recurrent_plan_on_device(RecurrentCell cell, bool backward, int64_t batch, int64_t hidden,
                                                PersistentPlan* plan) {
  *plan = PersistentPlan{};
  CooperativeDevice device;
  const cudaError_t status = query_cooperative_device(&device);
  if (status != cudaSuccess || device.cooperative == 0) return status;
  const PersistentPlan candidate =
      persistent_recurrent_plan(cell, backward, batch, hidden, device.multiprocessors, device.shared_optin);
  if (candidate.blocks == 0) return cudaSuccess;
  return with_kernel(cell, backward, [&](auto kernel) -> cudaError_t {
    int per_multiprocessor = 0;
    const cudaError_t result =
        resident_blocks_per_multiprocessor(kernel, candidate.threads, candidate.shared_bytes, &per_multiprocessor);
    if (result == cudaSuccess &&
        static_cast<int64_t>(per_multiprocessor) * device.multiprocessors >= candidate.blocks) {
      *plan = candidate;
    }
    return result;
  });
}

cudaError_t launch_persistent_lstm_forward(const PersistentLayer& layer, const PersistentPlan& plan,
                                           const PersistentForwardBuffers& buffers, cudaStream_t stream) {
  if (buffers.c_state == nullptr) return cudaErrorInvalidValue;
  return launch_cooperative(persistent_forward_kernel<RecurrentCell::kLstm>, layer, plan, buffers, stream);
}

cudaError_t launch_persistent_gru_forward(const PersistentLayer& layer, const PersistentPlan& plan,
                                          const PersistentForwardBuffers& buffers, cudaStream_t stream) {
  return launch_cooperative(persistent_forward_kernel<RecurrentCell::kGru>, layer, plan, buffers, stream);
}

cudaError_t launch_persistent_lstm_backward(const PersistentLayer& layer, const PersistentPlan& plan,
                                            const PersistentBackwardBuffers& buffers, cudaStream_t stream) {
  if (buffers.c0 == nullptr || buffers.grad_c == nullptr) return cudaErrorInvalidValue;
  return launch_cooperative(persistent_backward_kernel<RecurrentCell::kLstm>, layer, plan, buffers, stream);
}

cudaError_t launch_persistent_gru_backward(const PersistentLayer& layer, const PersistentPlan& plan,
                                           const PersistentBackwardBuffers& buffers, cudaStream_t stream) {
  if (buffers.previous_h == nullptr || buffers.grad_input_gates == nullptr || buffers.direct == nullptr) {
    return cudaErrorInvalidValue;
  }
  return launch_cooperative(persistent_backward_kernel<RecurrentCell::kGru>, layer, plan, buffers, stream);
}

}  // namespace cuda
}  // namespace fastattn
