// launch.h: the framework-free interface of fastattn's CUDA kernels (csrc/cuda/*.cu).
//
// Every launch function takes raw device pointers, sizes, strides and a cudaStream_t
// and returns the cudaError_t of its launches; nothing here includes torch.  The torch
// binding (binding.cpp) checks the arguments, allocates outputs and scratch, and
// calls these on the current stream.  Element pointers are `const void*` whose type is
// `dtype`; "accumulation" buffers (Acc) are float, or double when dtype is float64.
// Sizes and offsets are int64_t throughout (64-bit indexing).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "../common/attention_math.h"

namespace fastattn {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// ---------------------------------------------------------------- attention

// The inputs of attention_forward / attention_backward in the canonical layouts of
// csrc/ops.cpp: query (N, T, D) contiguous; keys (N, S, D) and values (N, S, Dv) with
// contiguous rows and a batch stride in elements (0 for keys shared by the batch).
struct AttentionProblem {
  DType dtype = DType::kFloat32;
  ScoreKind score = ScoreKind::kDot;
  int64_t batch = 0, query_length = 0, source_length = 0, score_dim = 0, value_dim = 0;
  const void* query = nullptr;
  const void* keys = nullptr;
  int64_t keys_batch_stride = 0;
  const void* values = nullptr;
  int64_t values_batch_stride = 0;
  const void* v = nullptr;     // additive: (Da,) in dtype
  const void* bias = nullptr;  // additive, optional: (Da,) in dtype
  double scale = 1.0;
  const int64_t* lengths = nullptr;         // (N,) or null
  const bool* key_padding_mask = nullptr;   // (N, S) or null
  bool causal = false;
  int64_t window = -1;                      // < 0: global attention
  const void* center = nullptr;             // (N, T) in Acc, or null (local-m: center = t)
  bool gaussian = false;
};

struct AttentionForwardBuffers {
  void* context = nullptr;          // (N, T, Dv) in dtype
  void* logsumexp = nullptr;        // (N, T) Acc
  void* scores = nullptr;           // (N, T, S) Acc filled with -inf, or null: weights wanted
  void* weights = nullptr;          // (N, T, S) in dtype, or null
  int64_t splits = 1;               // key splits per query row (attention_forward_splits)
  void* partial_context = nullptr;  // splits > 1: (N*T, splits, Dv) Acc
  void* partial_max = nullptr;      // splits > 1: (N*T, splits) Acc
  void* partial_sum = nullptr;      // splits > 1: (N*T, splits) Acc
};

struct AttentionBackwardBuffers {
  const void* grad_context = nullptr;  // (N, T, Dv) in dtype
  const void* grad_weights = nullptr;  // (N, T, S) in dtype, or null
  const void* logsumexp = nullptr;     // (N, T) Acc: read by the tensor-core backward alone (the
                                       // per-row kernels recompute each row's max and sum, RowTerms)
  void* grad_query = nullptr;          // (N, T, D) in dtype
  void* grad_keys = nullptr;           // (N, S, D) in dtype
  void* grad_values = nullptr;         // (N, S, Dv) in dtype; unused with values_are_keys
  void* grad_center = nullptr;         // (N, T) Acc, or null
  void* grad_v_rows = nullptr;         // additive: (N, T, Da) Acc, summed over rows by the caller (on
                                       // the tensor cores: (Da) Acc, grad_v itself)
  void* row_dot = nullptr;             // the tensor-core backward's scratch (N, T) Acc
  void* row_terms = nullptr;           // launch_attention_backward's scratch (N*T) RowTerms<Acc>: each
                                       // row's softmax terms for backward_keys_kernel
  int64_t splits = 1;                  // key splits per query row of backward_rows_kernel
                                       // (attention_forward_splits of the problem)
  void* partial_row_terms = nullptr;   // splits > 1: (N*T, splits) OnlineRowTerms<Acc> scratch
  void* partial_grad_query = nullptr;  // splits > 1: (N*T, splits, D) Acc scratch
  void* partial_grad_v = nullptr;      // splits > 1, additive: (N*T, splits, Da) Acc scratch
  bool values_are_keys = false;        // keys and values one tensor (D == Dv): the value terms are
                                       // added to grad_keys, as that tensor's one gradient
};

// Acc elements of one RowTerms / OnlineRowTerms (the last dimension of their scratch).
constexpr int64_t kRowTermsElements = sizeof(RowTerms<float>) / sizeof(float);
constexpr int64_t kOnlineRowTermsElements = sizeof(OnlineRowTerms<float>) / sizeof(float);

// How many blocks split the keys of one query row: 1 when the rows alone fill the
// GPU, more for few rows over long sources (decode steps), as many as fit in one wave
// of the forward kernel's resident blocks.
int64_t attention_forward_splits(const AttentionProblem& problem, int multiprocessors);

cudaError_t launch_attention_forward(const AttentionProblem& problem, const AttentionForwardBuffers& buffers,
                                     cudaStream_t stream);
cudaError_t launch_attention_backward(const AttentionProblem& problem, const AttentionBackwardBuffers& buffers,
                                      cudaStream_t stream);
// The multi-query forward on the tensor cores (attention_tensor_core.cu): float16 /
// bfloat16, score "dot", "cosine" or "additive" (v given), D and Dv in {64, 128}, query / keys /
// values 16-byte aligned
// with batch strides of multiples of 8 elements, on a device of compute capability
// 8.0 or later.  It writes context and logsumexp as launch_attention_forward does;
// buffers.weights must be null and buffers.splits 1 (anything else:
// cudaErrorInvalidValue).  The binding takes it for problems it supports with at
// least kTensorCoreMinQueries query rows (decode steps keep launch_attention_forward).
constexpr int64_t kTensorCoreMinQueries = 16;
bool attention_tensor_core_supported(const AttentionProblem& problem, int compute_capability_major);
cudaError_t launch_attention_forward_tensor_core(const AttentionProblem& problem,
                                                 const AttentionForwardBuffers& buffers, cudaStream_t stream);
// Its backward, for the problems of attention_tensor_core_supported, recomputing from
// logsumexp (grad_context 16-byte aligned): the gradients of launch_attention_backward
// without grad_weights (it must be null; grad_center, when given, float; additive:
// grad_v_rows needs only Da floats, which get grad_v itself, the sum over every row),
// row_dot as scratch (from the forward run again in float: the context is not read),
// and grad_query_accumulator a float (N, T, D) scratch.
cudaError_t launch_attention_backward_tensor_core(const AttentionProblem& problem,
                                                  const AttentionBackwardBuffers& buffers,
                                                  float* grad_query_accumulator, cudaStream_t stream);

// index[row] for rows of weights (rows, S) in dtype: with uniforms (rows,) in [0, 1),
// the first position whose running sum of positive weights exceeds u * total; without,
// the first argmax; 0 for a row with no positive weight.
cudaError_t launch_sample_positions(DType dtype, const void* weights, int64_t rows, int64_t source_length,
                                    const double* uniforms, int64_t* index, cudaStream_t stream);

// out = fast_tanh(in) (csrc/common/fast_tanh.h), float32.
cudaError_t launch_fast_tanh(const float* input, float* output, int64_t size, cudaStream_t stream);

// ---------------------------------------------------------------- hard attention's outputs
// Rows (N * T) of weights (N, T, S), positions index (N, T) and values (N, S, Dv), contiguous.
struct HardAttentionOutputsProblem {
  DType weights_dtype = DType::kFloat32;  // of the weights, the log-probability and their gradients
  DType values_dtype = DType::kFloat32;   // of the values and the context (the backward: of grad_context)
  int64_t batch = 0, queries = 0, source_length = 0, value_dim = 0;
};
// context (N, T, Dv) = values[n, index] times the row's factor (1, 0 for a row of zero
// weights, NaN for a NaN row) and log_prob (N, T) = log(w_index / sum_j w_j), each clamped
// below at the weights' dtype's smallest normal, 0 for a zero row.  A position outside
// [0, S) sets *outside (zeroed by the caller) and its row is left unwritten.
cudaError_t launch_hard_attention_outputs(const HardAttentionOutputsProblem& problem, const void* weights,
                                          const int64_t* index, const void* values, void* context, void* log_prob,
                                          int* outside, cudaStream_t stream);
// Their gradients: grad_weights (N, T, S) from grad_log_prob (both null without it), and
// grad_value_sums (N, S, Dv) in the accumulation type of grad_context's dtype (float, double
// for float64), zeroed by the caller, from grad_context (null without it; factor then
// needs rows floats of scratch).  *outside as the forward's.
cudaError_t launch_hard_attention_outputs_backward(const HardAttentionOutputsProblem& problem,
                                                   const void* grad_context, const void* grad_log_prob,
                                                   const void* weights, const int64_t* index, void* grad_weights,
                                                   void* grad_value_sums, float* factor, int* outside,
                                                   cudaStream_t stream);

// ---------------------------------------------------------------- recurrent cells
// One time step of a batch of B rows, dtype float32 or float64 (the binding computes
// float16 / bfloat16 in float32).  Row b is active when lengths is null or
// t < lengths[b]; inactive rows keep their state and output 0 (as the CPU kernels).
// The forward steps' biases, states, saved gates and outputs are in `storage`: the
// compute dtype, or float16 / bfloat16 for a float32 step (a cell op's own inputs and
// outputs, read and written as they are: no conversion kernels around the step).

struct RecurrentStep {
  DType dtype = DType::kFloat32;
  int64_t batch = 0, hidden = 0;
  const int64_t* lengths = nullptr;  // (B,) or null
  int64_t time = 0;
  DType storage = DType::kFloat32;
};

// LSTM: gates (dtype, row stride gates_stride) = W_ih x; saved_gates (storage, same
// stride; may be gates itself) receives i, f, g, o; hidden_gates (dtype, (B, 4H)) =
// h W_hh^T; biases (4H,) or null.  c_prev (B, H) in, c_state (B, H) out (may be c_prev:
// in place), h_state (B, H) out (written for active rows); saved_c (row stride
// gates_stride) and output (B, H) optional: c' (the kept c for inactive rows) and h'
// (0 inactive).
cudaError_t launch_lstm_step_forward(const RecurrentStep& step, const void* gates, int64_t gates_stride,
                                     void* saved_gates, const void* hidden_gates, const void* b_ih,
                                     const void* b_hh, const void* c_prev, void* c_state, void* h_state,
                                     void* saved_c, void* output, cudaStream_t stream);
// grad_h (B, H) the gradient reaching h' (state), grad_output (B, H) or null;
// grad_c (B, H) in/out; gates / c_prev / c_next rows with their strides; grad_gates
// (B, 4H) out (0 for inactive rows).
cudaError_t launch_lstm_step_backward(const RecurrentStep& step, const void* grad_h, const void* grad_output,
                                      void* grad_c, const void* gates, int64_t gates_stride, const void* c_prev,
                                      int64_t c_prev_stride, const void* c_next, int64_t c_next_stride,
                                      void* grad_gates, cudaStream_t stream);
// GRU: gates (dtype, row stride 4H) hold W_ih x in the first 3H; saved_gates (storage,
// (B, 4H); may be gates itself) receives r, z, n and W_hn h + b_hn; hidden_gates (dtype,
// (B, 3H)); h_prev (B, H) in, h_state (B, H) out (may be h_prev); output optional.
cudaError_t launch_gru_step_forward(const RecurrentStep& step, const void* gates, void* saved_gates,
                                    const void* hidden_gates, const void* b_ih, const void* b_hh,
                                    const void* h_prev, void* h_state, void* output, cudaStream_t stream);
// grad_input_gates / grad_hidden_gates (B, 3H) out, direct (B, H) out: dh' * z.
cudaError_t launch_gru_step_backward(const RecurrentStep& step, const void* grad_h, const void* grad_output,
                                     const void* gates, const void* previous_h, void* grad_input_gates,
                                     void* grad_hidden_gates, void* direct, cudaStream_t stream);
// For active rows: grad_h = recurrent (+ direct when not null); others keep grad_h.
cudaError_t launch_take_recurrent_gradient(const RecurrentStep& step, const void* recurrent, const void* direct,
                                           void* grad_h, cudaStream_t stream);

// ---------------------------------------------------------------- persistent recurrent layers
// The recurrent loop of a whole LSTM / GRU layer (one direction) in ONE cooperative
// launch that keeps W_hh in shared memory across the grid (persistent_recurrent.cu).
// The recurrent GEMM's operands (W_hh, h, the gate gradients) are in the layer's
// `operand` dtype: float32 (FMAs) or float16 / bfloat16 (tensor cores, float32
// accumulation, compute capability 8.0 or later); all other buffers are float32.  The
// input projection (forward) and the grad_x / grad_W GEMMs (backward) stay
// whole-sequence GEMMs in the binding.  Results, `saved` layouts and lengths semantics
// are those of the per-step path above (csrc/cpu/recurrent.cpp).

enum class RecurrentCell : int { kLstm = 0, kGru = 1 };

// How a layer's recurrent loop is spread over the grid: each of `blocks` blocks owns
// `units_per_block` consecutive hidden units.  blocks == 0: the shape does not fit (W_hh
// slice beyond shared memory, or more blocks than the GPU runs at once); use the
// per-step path.
struct PersistentPlan {
  int blocks = 0;
  int threads = 0;
  int64_t units_per_block = 0;
  int64_t shared_bytes = 0;
};

// The plan for a GPU with `multiprocessors` SMs (one block each) and
// `shared_bytes_per_block` of dynamic shared memory per block, for GEMM operands in
// `operand` (float64: none); pure arithmetic.
PersistentPlan persistent_recurrent_plan(RecurrentCell cell, bool backward, DType operand, int64_t batch,
                                         int64_t hidden, int multiprocessors, int64_t shared_bytes_per_block);
// The plan on the current device: its SM count and opt-in shared memory, cooperative
// launch support, compute capability 8.0 for float16 / bfloat16 operands, and the
// occupancy of the kernel (at least one block per SM).
cudaError_t persistent_recurrent_plan_on_device(RecurrentCell cell, bool backward, DType operand, int64_t batch,
                                                int64_t hidden, PersistentPlan* plan);

struct PersistentLayer {
  int64_t steps = 0, batch = 0, hidden = 0;
  const int64_t* lengths = nullptr;  // (B,) or null
  bool reverse = false;
  DType operand = DType::kFloat32;   // of w_hh and the GEMM operands: float32, float16 or bfloat16
  const void* w_hh = nullptr;        // (gates * H, H) in operand
  unsigned long long* barrier = nullptr;  // one counter, zero on entry (the grid barrier's)
};

struct PersistentForwardBuffers {
  const float* b_ih = nullptr;  // (gates * H,) or null
  const float* b_hh = nullptr;  // (gates * H,) or null
  // (T, B, width), W_ih x in the first gates * H columns on entry; on exit the layer's
  // saved: LSTM width 5H [i | f | g | o | c'], GRU width 4H [r | z | n | W_hn h + b_hn].
  float* saved = nullptr;
  float* output = nullptr;     // (T, B, H)
  float* h_state = nullptr;    // (B, H): h0 on entry, h_n on exit
  float* c_state = nullptr;    // LSTM (B, H): c0 on entry, c_n on exit
  float* h_scratch = nullptr;  // (B, H): the other half of the h double buffer
  void* h_operand = nullptr;   // float16 / bfloat16 operand: (2, B, H) in it, h0 in the first half on entry
};

struct PersistentBackwardBuffers {
  const float* grad_output = nullptr;  // (T, B, H)
  const float* saved = nullptr;        // the forward's
  const float* c0 = nullptr;           // LSTM (B, H)
  const float* previous_h = nullptr;   // GRU (T, B, H): the state each step started from
  float* grad_h = nullptr;             // (B, H): grad_h_n on entry, grad_h0 on exit
  float* grad_c = nullptr;             // LSTM (B, H): grad_c_n on entry, grad_c0 on exit
  float* grad_gates = nullptr;         // (T, B, gates * H) out: LSTM's gate gradients, GRU's hidden side
  float* grad_input_gates = nullptr;   // GRU (T, B, 3H) out: the input side
  float* direct = nullptr;             // GRU scratch (B, H)
  void* gate_operand = nullptr;        // float16 / bfloat16 operand: scratch (2, B, gates * H) in it
};

cudaError_t launch_persistent_lstm_forward(const PersistentLayer& layer, const PersistentPlan& plan,
                                           const PersistentForwardBuffers& buffers, cudaStream_t stream);
cudaError_t launch_persistent_gru_forward(const PersistentLayer& layer, const PersistentPlan& plan,
                                          const PersistentForwardBuffers& buffers, cudaStream_t stream);
cudaError_t launch_persistent_lstm_backward(const PersistentLayer& layer, const PersistentPlan& plan,
                                            const PersistentBackwardBuffers& buffers, cudaStream_t stream);
cudaError_t launch_persistent_gru_backward(const PersistentLayer& layer, const PersistentPlan& plan,
                                           const PersistentBackwardBuffers& buffers, cudaStream_t stream);

// ---------------------------------------------------------------- fused attention-decoder step
// One inference step of AttentionDecoderCell, with input feeding or in Bahdanau's order
// (attention_decoder_step of csrc/ops.cpp) in ONE cooperative launch (decoder_step.cu),
// float32 / float16 / bfloat16 with float32 accumulation, no autograd.  Scores: additive
// (v . tanh(q + bias + k'), keys = K' precomputed), dot (scale * q . k) and cosine
// (scale * q . k / (|q| |k|)); q = query_weight s, or s itself (then score_dim == hidden).  Outputs as the composed
// op: output h~_t, h_next, c_next (LSTM), weights (B, S) with 0 at masked keys and for
// rows with no visible key.

struct DecoderStepProblem {
  // Of y, h, c, attentional, keys, values, query_weight, w_ih, w_hh, w_combine and the
  // outputs: float32, or float16 / bfloat16 (float32 accumulation) when every size and
  // row start fits 16-byte loads; v, bias, b_ih and b_hh are float32 whatever it is.
  DType dtype = DType::kFloat32;
  RecurrentCell cell = RecurrentCell::kLstm;
  ScoreKind score = ScoreKind::kDot;
  bool input_feeding = true;          // else Bahdanau: attend with s_{t-1}, the cell reads [y; c_t]
  int64_t batch = 0, input_size = 0, hidden = 0, source_length = 0, score_dim = 0, value_dim = 0;
  float scale = 1.0f;                 // dot and cosine
  const void* y = nullptr;            // (B, I)
  const void* h = nullptr;            // (B, H)
  const void* c = nullptr;            // LSTM (B, H); null for a GRU
  const void* attentional = nullptr;  // (B, H): h~_{t-1}, read with input feeding
  const void* keys = nullptr;         // (B, S, Dk) rows contiguous, batch stride below (0: shared)
  int64_t keys_batch_stride = 0;
  const void* values = nullptr;       // (B, S, Dv) rows contiguous
  int64_t values_batch_stride = 0;
  const void* query_weight = nullptr;  // (Dk, H): q = query_weight s; null: q = s (s_t or s_{t-1})
  const float* v = nullptr;            // additive (Dk,)
  const float* bias = nullptr;         // additive (Dk,) or null
  const int64_t* lengths = nullptr;    // (B,) or null
  const bool* key_padding_mask = nullptr;  // (B, S) or null
  const void* w_ih = nullptr;          // (G H, I + H) or, Bahdanau, (G H, I + Dv); G = 4 LSTM, 3 GRU
  const void* w_hh = nullptr;          // (G H, H)
  const float* b_ih = nullptr;         // (G H,) or null
  const float* b_hh = nullptr;         // (G H,) or null
  const void* w_combine = nullptr;     // (H, Dv + H)
  // Local-p (Luong 2015): keys j in [p - window, p + window] of p = S_b sigmoid(v_p .
  // tanh(W_p s)) (S_b: lengths[b] or S; s the query's state), the weights times a
  // Gaussian of sigma window / 2.  window 0: no window (the pointers below null).
  int64_t window = 0;
  int64_t position_dim = 0;                 // Dp
  const void* position_weight = nullptr;    // (Dp, H): W_p
  const float* position_v = nullptr;        // (Dp,): v_p
};

// How the step is spread: `blocks` co-resident blocks of `threads`; batch rows in tiles
// of `batch_tile` (each weight matrix is read once per tile); each batch row's keys in
// `splits` chunks of `keys_per_split`.  blocks == 0: not covered (the binding composes).
struct DecoderStepPlan {
  int blocks = 0;
  int threads = 0;
  int64_t batch_tile = 0;
  int64_t splits = 0;
  int64_t keys_per_split = 0;
  int64_t shared_bytes = 0;
};

struct DecoderStepBuffers {
  void* output = nullptr;            // (B, H) in dtype
  void* h_next = nullptr;            // (B, H) in dtype
  void* c_next = nullptr;            // LSTM (B, H) in dtype
  void* weights = nullptr;           // (B, S) in dtype
  float* scores = nullptr;           // scratch (B, S): the raw scores
  float* query = nullptr;            // scratch (B, Dk), with query_weight
  float* partial_context = nullptr;  // scratch (B, splits, Dv)
  float* partial_max = nullptr;      // scratch (B, splits)
  float* partial_sum = nullptr;      // scratch (B, splits)
  unsigned long long* barrier = nullptr;  // one counter, zero on entry
  float* position = nullptr;         // scratch (B, Dp): W_p s, local-p
  float* centers = nullptr;          // scratch (B,): p, local-p
};

// The plan for a GPU with `multiprocessors` SMs (one block each) and
// `shared_bytes_per_block` of dynamic shared memory per block; pure arithmetic (it reads
// the sizes and the dtype, not the pointers' alignment).
DecoderStepPlan decoder_step_plan(const DecoderStepProblem& problem, int multiprocessors,
                                  int64_t shared_bytes_per_block);
// The plan on the current device (SM count, opt-in shared memory, cooperative launch
// support, at least one resident block per SM for the kernel its loads take).
cudaError_t decoder_step_plan_on_device(const DecoderStepProblem& problem, DecoderStepPlan* plan);
cudaError_t launch_decoder_step(const DecoderStepProblem& problem, const DecoderStepPlan& plan,
                                const DecoderStepBuffers& buffers, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastattn
