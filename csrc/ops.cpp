// The schemas of every fastattn op, declared once.  Kernels register per device in
// TORCH_LIBRARY_IMPL(fastattn, CPU, m) (csrc/cpu/) and, where built, CUDA
// (csrc/cuda/); the autograd and autocast kernels are C++ too (csrc/autograd.cpp,
// csrc/autocast.cpp), the fake (meta) ones Python (fastattn/ops/).  Layouts are the
// canonical ones of fastattn.reference:
// queries (N, T, D), keys and values (N, S, D), lengths (N,), key_padding_mask
// (N, S) bool, center (N, T), time-major sequences (T, B, features).
#include <torch/library.h>

TORCH_LIBRARY(fastattn, m) {
  // Fused score -> masked softmax -> context.  score: "dot" (e = scale * q.k; covers
  // dot, scaled_dot, general after q @ W_a, and location with keys = W_a[:S] shared
  // by the batch), "cosine" (e = scale * q.k / (|q| |k|)) or "additive"
  // (e = v . tanh(q + k + bias), q and k already projected; scale must be 1).  keys
  // may be (1, S, D): shared by the batch, their gradient summed over it.  weights is
  // (N, T, S) when return_weights, else empty; logsumexp (N, T) in the accumulation
  // dtype, -inf for fully masked rows.
  m.def(
      "attention_forward(Tensor query, Tensor keys, Tensor values, Tensor? v, Tensor? bias, "
      "str score, float scale, Tensor? lengths, Tensor? key_padding_mask, bool causal, "
      "int? window, Tensor? center, bool gaussian, bool return_weights) "
      "-> (Tensor context, Tensor weights, Tensor logsumexp)");
  // Gradients of attention_forward; grad_v, grad_bias and grad_center are empty when
  // the forward had no v / bias / Gaussian center.  The kernels recompute each row's
  // softmax from the scores (logsumexp marks the fully masked rows); no kernel takes
  // grad_context . context from the forward's context, which in peaked rows rounds
  // differently from the row's own terms and swamps the score gradient's small differences.
  // values_are_keys (the forward was given one tensor as both, of one shape): grad_keys is
  // that tensor's gradient, both terms summed as the kernel goes, and grad_values is empty.
  m.def(
      "attention_backward(Tensor grad_context, Tensor? grad_weights, Tensor query, Tensor keys, "
      "Tensor values, Tensor? v, Tensor? bias, str score, float scale, Tensor? lengths, "
      "Tensor? key_padding_mask, bool causal, int? window, Tensor? center, bool gaussian, "
      "Tensor logsumexp, bool values_are_keys=False) -> (Tensor grad_query, Tensor grad_keys, "
      "Tensor grad_values, Tensor grad_v, Tensor grad_bias, Tensor grad_center)");
  // One position per row of weights (N, T, S): drawn from weights / sum(weights) when
  // sample, else the argmax (first on ties); 0 for rows whose weights are all zero.
  m.def("sample_positions(Tensor weights, bool sample, Generator? generator) -> Tensor");
  // Hard attention's outputs at positions index (N, T) of weights (N, T, S), values
  // (N, S, Dv) (fastattn.reference.hard.outputs_at): context (N, T, Dv) = the chosen value
  // rows times the row's factor (1, 0 for a row of zero weights, NaN for a NaN row), in the
  // values' dtype; log_prob (N, T) = log(w_index / sum_j w_j), each clamped below at the
  // smallest normal of the weights' dtype, 0 for a zero row, in the weights' dtype.  The
  // backward's grad_weights / grad_values (N, S, Dv, in grad_context's dtype) are empty when
  // grad_log_prob / grad_context is absent; it needs no values.
  m.def("hard_attention_outputs(Tensor weights, Tensor index, Tensor values) -> (Tensor context, Tensor log_prob)");
  m.def(
      "hard_attention_outputs_backward(Tensor? grad_context, Tensor? grad_log_prob, Tensor weights, "
      "Tensor index) -> (Tensor grad_weights, Tensor grad_values)");

  // LSTM cell (torch.nn gate order i, f, g, o).  saved (B, 4H): the gate activations.
  m.def(
      "lstm_cell_forward(Tensor x, Tensor h, Tensor c, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh) -> (Tensor h_next, Tensor c_next, Tensor saved)");
  m.def(
      "lstm_cell_backward(Tensor grad_h_next, Tensor grad_c_next, Tensor x, Tensor h, Tensor c, "
      "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor c_next, Tensor saved) "
      "-> (Tensor grad_x, Tensor grad_h, Tensor grad_c, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_b_ih, Tensor grad_b_hh)");
  // GRU cell (gate order r, z, n).  saved (B, 4H): r, z, n and W_hn h + b_hn.
  m.def(
      "gru_cell_forward(Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) "
      "-> (Tensor h_next, Tensor saved)");
  m.def(
      "gru_cell_backward(Tensor grad_h_next, Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor saved) -> (Tensor grad_x, Tensor grad_h, "
      "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh)");
  // One layer, one direction over x (T, B, I): the input projection of all steps is
  // one GEMM, the recurrence runs in C++.  With lengths, sequence b updates only at
  // t < lengths[b] (output 0 after); reverse walks t from T-1 down to 0.
  // LSTM saved (T, B, 5H): gate activations i, f, g, o and the cell state c_t.
  m.def(
      "lstm_layer_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? lengths, bool reverse) "
      "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor saved)");
  m.def(
      "lstm_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor x, "
      "Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? lengths, bool reverse, Tensor output, Tensor saved) -> (Tensor grad_x, "
      "Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, "
      "Tensor grad_b_hh)");
  // GRU saved (T, B, 4H): r, z, n and W_hn h + b_hn per step.
  m.def(
      "gru_layer_forward(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? lengths, bool reverse) -> (Tensor output, Tensor h_n, Tensor saved)");
  m.def(
      "gru_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor x, Tensor h0, Tensor w_ih, "
      "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? lengths, bool reverse, Tensor output, "
      "Tensor saved) -> (Tensor grad_x, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_b_ih, Tensor grad_b_hh)");

  // One step of fastattn.nn.AttentionDecoderCell (csrc/decoder_step.cpp), composed of
  // attention_forward (one query; query_weight, when given, projects the state first:
  // W_q^T for additive) and lstm_cell_forward (c given) or gru_cell_forward (c absent),
  // then output = tanh([context; h_next] @ w_combine^T).  keys (B or 1, S, Dk), values
  // (B, S, Dv); c_next is empty for a GRU; weights (B, S).  Local-p attention (Luong
  // 2015) with window, position_weight W_p^T (H, Dp) and position_v v_p (Dp,): the
  // window of half-width `window` and the Gaussian of sigma window / 2 centred on
  // p_t = S_b sigmoid(v_p . tanh(s W_p^T)), S_b the row's length (or S), s the query's state.
  m.def(
      "attention_decoder_step(Tensor y, Tensor h, Tensor? c, Tensor attentional, Tensor keys, "
      "Tensor values, Tensor? query_weight, Tensor? v, Tensor? bias, str score, float scale, "
      "Tensor? lengths, Tensor? key_padding_mask, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor w_combine, bool input_feeding, int? window=None, "
      "Tensor? position_weight=None, Tensor? position_v=None) "
      "-> (Tensor output, Tensor h_next, Tensor c_next, Tensor weights)");
  // attention_decoder_step's inference path (no autograd): the one-launch CUDA kernel
  // (csrc/cuda/decoder_step.cu) where it covers the step, the composed step elsewhere.
  // attention_decoder_step calls it for CUDA tensors when no gradient is recorded.
  m.def(
      "attention_decoder_step_inference(Tensor y, Tensor h, Tensor? c, Tensor attentional, Tensor keys, "
      "Tensor values, Tensor? query_weight, Tensor? v, Tensor? bias, str score, float scale, "
      "Tensor? lengths, Tensor? key_padding_mask, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor w_combine, bool input_feeding, int? window=None, "
      "Tensor? position_weight=None, Tensor? position_v=None) "
      "-> (Tensor output, Tensor h_next, Tensor c_next, Tensor weights)");

  // The differentiable forms of the ops above: the same maths in fastattn.reference's
  // PyTorch (CompositeImplicitAutograd, fastattn/ops/higher_order.py), without the
  // outputs that only feed a backward kernel.  The autograd kernels (csrc/autograd.cpp)
  // differentiate them when a backward must itself be differentiable
  // (create_graph=True), which the *_backward kernels are not.
  m.def(
      "attention_reference(Tensor query, Tensor keys, Tensor values, Tensor? v, Tensor? bias, "
      "str score, float scale, Tensor? lengths, Tensor? key_padding_mask, bool causal, "
      "int? window, Tensor? center, bool gaussian) -> (Tensor context, Tensor weights)");
  m.def(
      "lstm_cell_reference(Tensor x, Tensor h, Tensor c, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh) -> (Tensor h_next, Tensor c_next)");
  m.def(
      "gru_cell_reference(Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) "
      "-> Tensor h_next");
  m.def(
      "lstm_layer_reference(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? lengths, bool reverse) -> (Tensor output, Tensor h_n, Tensor c_n)");
  m.def(
      "gru_layer_reference(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? lengths, bool reverse) -> (Tensor output, Tensor h_n)");
  m.def(
      "hard_attention_outputs_reference(Tensor weights, Tensor index, Tensor values) "
      "-> (Tensor context, Tensor log_prob)");

  // The kernels' tanh approximation (csrc/common/fast_tanh.h), float32, for its test.
  m.def("fast_tanh(Tensor x) -> Tensor");
  // Inside torch.autocast for its device: tensor in the autocast dtype through torch's
  // autocast cache, as torch's own autocast kernels cast it (a float32 leaf that requires
  // grad, a parameter, is cast once per autocast region); tensor itself outside autocast,
  // in that dtype already, or float64.  For the backends whose ops have no autocast
  // kernels (the Triton ops).  CompositeImplicitAutograd.
  m.def("autocast_cast(Tensor(a) tensor) -> Tensor(a)");
}
