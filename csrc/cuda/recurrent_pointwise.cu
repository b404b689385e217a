// recurrent_pointwise.cu: the fused pointwise part of one LSTM or GRU time step, forward
// and backward, for the cell ops and the per-step loop of the layer ops (csrc/ops.cpp;
// the binding runs the GEMMs in ATen and calls these between them).  float32 and
// float64 (float16 / bfloat16 are computed in float32 by the binding); the forward steps
// read a float16 / bfloat16 cell's biases and state and write its outputs as they are
// stored (RecurrentStep::storage), so a cell op is its two GEMMs and one kernel.
//
// Fuses: the bias additions, every gate nonlinearity, the state update, the saving of
// what the backward needs, and the masking of finished sequences (t >= lengths[b]:
// state kept, output 0, zero gate gradients), one thread per (b, j) element, the gate
// blocks of torch.nn ([i | f | g | o], [r | z | n]).  The equations
// (recurrent_cell_math.cuh) and the saved layouts are those of csrc/cpu/recurrent.cpp.
// Not handled: the recurrent GEMM (h W_hh^T, per step in the binding; the persistent
// kernels of persistent_recurrent.cu keep W_hh on chip instead); LSTM projections (proj_size).
#include "recurrent_cell_math.cuh"

namespace fastattn {
namespace cuda {
namespace {

__device__ __forceinline__ bool is_active(const RecurrentStep& step, int64_t b) {
  return step.lengths == nullptr || step.time < step.lengths[b];
}

// An element stored as S (T, or float16 / bfloat16 for T = float) in the compute type T.
template <typename T, typename S>
__device__ __forceinline__ T load_as(const S* source, int64_t index) {
  return static_cast<T>(to_acc(source[index]));
}
template <typename T, typename S>
__device__ __forceinline__ T bias_as(const S* bias, int64_t index) {
  return bias != nullptr ? load_as<T>(bias, index) : T(0);
}

#define FASTATTN_FOR_EACH_ELEMENT(step, index)                                                     \
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;                \
       index < (step).batch * (step).hidden; index += static_cast<int64_t>(gridDim.x) * blockDim.x)

template <typename T, typename S>
__global__ void lstm_step_forward_kernel(RecurrentStep step, const T* gates, int64_t gates_stride, S* saved_gates,
                                         const T* hidden_gates, const S* b_ih, const S* b_hh, const S* c_prev,
                                         S* c_state, S* h_state, S* saved_c, S* output) {
  const int64_t H = step.hidden;
  FASTATTN_FOR_EACH_ELEMENT(step, index) {
    const int64_t b = index / H, j = index % H;
    S* saved_row = saved_gates + b * gates_stride;
    if (is_active(step, b)) {
      const T* row = gates + b * gates_stride;
      const T* hidden_row = hidden_gates + b * 4 * H;
      auto pre_activation = [&](int64_t k) {  // (W_ih x + b_ih) + (W_hh h + b_hh) of gate k
        const int64_t at = k * H + j;
        return (row[at] + bias_as<T>(b_ih, at)) + (hidden_row[at] + bias_as<T>(b_hh, at));
      };
      const LstmForward<T> next = lstm_forward(pre_activation(0), pre_activation(1), pre_activation(2),
                                               pre_activation(3), load_as<T>(c_prev, index));
      saved_row[j] = from_acc<S>(next.i);
      saved_row[H + j] = from_acc<S>(next.f);
      saved_row[2 * H + j] = from_acc<S>(next.g);
      saved_row[3 * H + j] = from_acc<S>(next.o);
      c_state[index] = from_acc<S>(next.c);
      h_state[index] = from_acc<S>(next.h);
      if (saved_c != nullptr) saved_c[b * gates_stride + j] = from_acc<S>(next.c);
      if (output != nullptr) output[index] = from_acc<S>(next.h);
    } else {  // finished sequence: state kept, output 0
      const S kept = c_prev[index];
      for (int k = 0; k < 4; ++k) saved_row[k * H + j] = from_acc<S>(T(0));
      c_state[index] = kept;
      if (saved_c != nullptr) saved_c[b * gates_stride + j] = kept;
      if (output != nullptr) output[index] = from_acc<S>(T(0));
    }
  }
}

template <typename T>
__global__ void lstm_step_backward_kernel(RecurrentStep step, const T* grad_h, const T* grad_output, T* grad_c,
                                          const T* gates, int64_t gates_stride, const T* c_prev,
                                          int64_t c_prev_stride, const T* c_next, int64_t c_next_stride,
                                          T* grad_gates) {
  const int64_t H = step.hidden;
  FASTATTN_FOR_EACH_ELEMENT(step, index) {
    const int64_t b = index / H, j = index % H;
    T* grad_row = grad_gates + b * 4 * H;
    if (!is_active(step, b)) {
      for (int k = 0; k < 4; ++k) grad_row[k * H + j] = T(0);
      continue;
    }
    const T* row = gates + b * gates_stride;
    const T dh = grad_h[index] + (grad_output != nullptr ? grad_output[index] : T(0));
    const LstmBackward<T> grad = lstm_backward(row[j], row[H + j], row[2 * H + j], row[3 * H + j],
                                               c_prev[b * c_prev_stride + j], c_next[b * c_next_stride + j], dh,
                                               grad_c[index]);
    grad_c[index] = grad.grad_c_prev;
    grad_row[j] = grad.d_i;
    grad_row[H + j] = grad.d_f;
    grad_row[2 * H + j] = grad.d_g;
    grad_row[3 * H + j] = grad.d_o;
  }
}

template <typename T, typename S>
__global__ void gru_step_forward_kernel(RecurrentStep step, const T* gates, S* saved_gates, const T* hidden_gates,
                                        const S* b_ih, const S* b_hh, const S* h_prev, S* h_state, S* output) {
  const int64_t H = step.hidden;
  FASTATTN_FOR_EACH_ELEMENT(step, index) {
    const int64_t b = index / H, j = index % H;
    S* saved_row = saved_gates + b * 4 * H;
    if (!is_active(step, b)) {
      for (int k = 0; k < 4; ++k) saved_row[k * H + j] = from_acc<S>(T(0));
      h_state[index] = h_prev[index];
      if (output != nullptr) output[index] = from_acc<S>(T(0));
      continue;
    }
    const T* row = gates + b * 4 * H;
    const T* hidden_row = hidden_gates + b * 3 * H;
    auto input_part = [&](int64_t k) { return row[k * H + j] + bias_as<T>(b_ih, k * H + j); };
    auto hidden_part = [&](int64_t k) { return hidden_row[k * H + j] + bias_as<T>(b_hh, k * H + j); };
    const GruForward<T> next = gru_forward(input_part(0), input_part(1), input_part(2), hidden_part(0),
                                           hidden_part(1), hidden_part(2), load_as<T>(h_prev, index));
    saved_row[j] = from_acc<S>(next.r);
    saved_row[H + j] = from_acc<S>(next.z);
    saved_row[2 * H + j] = from_acc<S>(next.n);
    saved_row[3 * H + j] = from_acc<S>(next.hidden_n);
    h_state[index] = from_acc<S>(next.h);
    if (output != nullptr) output[index] = from_acc<S>(next.h);
  }
}

template <typename T>
__global__ void gru_step_backward_kernel(RecurrentStep step, const T* grad_h, const T* grad_output, const T* gates,
                                         const T* previous_h, T* grad_input_gates, T* grad_hidden_gates,
                                         T* direct) {
  const int64_t H = step.hidden;
  FASTATTN_FOR_EACH_ELEMENT(step, index) {
    const int64_t b = index / H, j = index % H;
    T* input_row = grad_input_gates + b * 3 * H;
    T* hidden_row = grad_hidden_gates + b * 3 * H;
    if (!is_active(step, b)) {
      for (int k = 0; k < 3; ++k) input_row[k * H + j] = hidden_row[k * H + j] = T(0);
      continue;
    }
    const T* row = gates + b * 4 * H;
    const T r = row[j];
    const T dh = grad_h[index] + (grad_output != nullptr ? grad_output[index] : T(0));
    const GruBackward<T> grad = gru_backward(r, row[H + j], row[2 * H + j], row[3 * H + j], previous_h[index], dh);
    input_row[j] = grad.d_r;
    input_row[H + j] = grad.d_z;
    input_row[2 * H + j] = grad.d_n;
    hidden_row[j] = grad.d_r;
    hidden_row[H + j] = grad.d_z;
    hidden_row[2 * H + j] = grad.d_n * r;
    direct[index] = grad.direct;
  }
}

template <typename T>
__global__ void take_recurrent_gradient_kernel(RecurrentStep step, const T* recurrent, const T* direct, T* grad_h) {
  FASTATTN_FOR_EACH_ELEMENT(step, index) {
    if (is_active(step, index / step.hidden)) {
      grad_h[index] = recurrent[index] + (direct != nullptr ? direct[index] : T(0));
    }
  }
}

#undef FASTATTN_FOR_EACH_ELEMENT

constexpr int kPointwiseThreads = 256;

unsigned int pointwise_blocks(const RecurrentStep& step) {
  const int64_t blocks = (step.batch * step.hidden + kPointwiseThreads - 1) / kPointwiseThreads;
  return grid_for(blocks < 65536 ? blocks : 65536);
}

// Calls body(T{}) for the float32 / float64 steps; other dtypes are an error.
template <typename Body>
cudaError_t dispatch_float(const RecurrentStep& step, Body&& body) {
  if (step.batch * step.hidden == 0) return cudaSuccess;
  if (step.dtype == DType::kFloat32) return body(float{});
  if (step.dtype == DType::kFloat64) return body(double{});
  return cudaErrorInvalidValue;
}

// Calls body(T{}, S{}) for a forward step: T its compute type, S its storage type (T, or
// float16 / bfloat16 for float32); other pairs are an error.
template <typename Body>
cudaError_t dispatch_float_and_storage(const RecurrentStep& step, Body&& body) {
  if (step.dtype == DType::kFloat32 && step.storage == DType::kFloat16) {
    return step.batch * step.hidden == 0 ? cudaSuccess : body(float{}, __half{});
  }
  if (step.dtype == DType::kFloat32 && step.storage == DType::kBFloat16) {
    return step.batch * step.hidden == 0 ? cudaSuccess : body(float{}, __nv_bfloat16{});
  }
  if (step.storage != step.dtype) return cudaErrorInvalidValue;
  return dispatch_float(step, [&](auto element) { return body(element, element); });
}

}  // namespace

cudaError_t launch_lstm_step_forward(const RecurrentStep& step, const void* gates, int64_t gates_stride,
                                     void* saved_gates, const void* hidden_gates, const void* b_ih,
                                     const void* b_hh, const void* c_prev, void* c_state, void* h_state,
                                     void* saved_c, void* output, cudaStream_t stream) {
  return dispatch_float_and_storage(step, [&](auto element, auto stored) -> cudaError_t {
    using T = decltype(element);
    using S = decltype(stored);
    lstm_step_forward_kernel<T, S><<<pointwise_blocks(step), kPointwiseThreads, 0, stream>>>(
        step, static_cast<const T*>(gates), gates_stride, static_cast<S*>(saved_gates),
        static_cast<const T*>(hidden_gates), static_cast<const S*>(b_ih), static_cast<const S*>(b_hh),
        static_cast<const S*>(c_prev), static_cast<S*>(c_state), static_cast<S*>(h_state), static_cast<S*>(saved_c),
        static_cast<S*>(output));
    return cudaGetLastError();
  });
}

cudaError_t launch_lstm_step_backward(const RecurrentStep& step, const void* grad_h, const void* grad_output,
                                      void* grad_c, const void* gates, int64_t gates_stride, const void* c_prev,
                                      int64_t c_prev_stride, const void* c_next, int64_t c_next_stride,
                                      void* grad_gates, cudaStream_t stream) {
  return dispatch_float(step, [&](auto element) -> cudaError_t {
    using T = decltype(element);
    lstm_step_backward_kernel<T><<<pointwise_blocks(step), kPointwiseThreads, 0, stream>>>(
        step, static_cast<const T*>(grad_h), static_cast<const T*>(grad_output), static_cast<T*>(grad_c),
        static_cast<const T*>(gates), gates_stride, static_cast<const T*>(c_prev), c_prev_stride,
        static_cast<const T*>(c_next), c_next_stride, static_cast<T*>(grad_gates));
    return cudaGetLastError();
  });
}

cudaError_t launch_gru_step_forward(const RecurrentStep& step, const void* gates, void* saved_gates,
                                    const void* hidden_gates, const void* b_ih, const void* b_hh,
                                    const void* h_prev, void* h_state, void* output, cudaStream_t stream) {
  return dispatch_float_and_storage(step, [&](auto element, auto stored) -> cudaError_t {
    using T = decltype(element);
    using S = decltype(stored);
    gru_step_forward_kernel<T, S><<<pointwise_blocks(step), kPointwiseThreads, 0, stream>>>(
        step, static_cast<const T*>(gates), static_cast<S*>(saved_gates), static_cast<const T*>(hidden_gates),
        static_cast<const S*>(b_ih), static_cast<const S*>(b_hh), static_cast<const S*>(h_prev),
        static_cast<S*>(h_state), static_cast<S*>(output));
    return cudaGetLastError();
  });
}

cudaError_t launch_gru_step_backward(const RecurrentStep& step, const void* grad_h, const void* grad_output,
                                     const void* gates, const void* previous_h, void* grad_input_gates,
                                     void* grad_hidden_gates, void* direct, cudaStream_t stream) {
  return dispatch_float(step, [&](auto element) -> cudaError_t {
    using T = decltype(element);
    gru_step_backward_kernel<T><<<pointwise_blocks(step), kPointwiseThreads, 0, stream>>>(
        step, static_cast<const T*>(grad_h), static_cast<const T*>(grad_output), static_cast<const T*>(gates),
        static_cast<const T*>(previous_h), static_cast<T*>(grad_input_gates), static_cast<T*>(grad_hidden_gates),
        static_cast<T*>(direct));
    return cudaGetLastError();
  });
}

cudaError_t launch_take_recurrent_gradient(const RecurrentStep& step, const void* recurrent, const void* direct,
                                           void* grad_h, cudaStream_t stream) {
  return dispatch_float(step, [&](auto element) -> cudaError_t {
    using T = decltype(element);
    take_recurrent_gradient_kernel<T><<<pointwise_blocks(step), kPointwiseThreads, 0, stream>>>(
        step, static_cast<const T*>(recurrent), static_cast<const T*>(direct), static_cast<T*>(grad_h));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fastattn
