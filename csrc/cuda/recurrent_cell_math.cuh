// recurrent_cell_math.cuh: the LSTM and GRU equations of one (batch row, hidden unit)
// element, forward and backward, shared by the per-step pointwise kernels
// (recurrent_pointwise.cu) and the persistent layer kernels (persistent_recurrent.cu).
// Gate order of torch.nn ([i | f | g | o], [r | z | n]); the equations of
// csrc/cpu/recurrent.cpp and fastattn.reference.  float32 takes tanh from fast_tanh
// (csrc/common/fast_tanh.h) and sigmoid from fast_sigmoid (csrc/common/fast_sigmoid.h), as the CPU does;
// float64 uses tanh / exp.  Masking by lengths is the callers' business.
#pragma once

#include "../common/fast_sigmoid.h"
#include "device_common.cuh"

namespace fastattn {
namespace cuda {

__device__ __forceinline__ float gate_tanh(float x) { return fast_tanh(x); }
__device__ __forceinline__ float gate_sigmoid(float x) { return fast_sigmoid(x); }
__device__ __forceinline__ double gate_tanh(double x) { return tanh(x); }
__device__ __forceinline__ double gate_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

// LSTM: the activated gates and the new state from the gates' pre-activations.
template <typename T>
struct LstmForward {
  T i, f, g, o, c, h;
};
template <typename T>
__device__ __forceinline__ LstmForward<T> lstm_forward(T pre_i, T pre_f, T pre_g, T pre_o, T c_prev) {
  LstmForward<T> out;
  out.i = gate_sigmoid(pre_i);
  out.f = gate_sigmoid(pre_f);
  out.g = gate_tanh(pre_g);
  out.o = gate_sigmoid(pre_o);
  out.c = out.f * c_prev + out.i * out.g;
  out.h = out.o * gate_tanh(out.c);
  return out;
}

// LSTM backward: the gate pre-activation gradients and the gradient reaching c_prev,
// from the saved gates, c_prev, c_next, dh (into h') and dc (into c').
template <typename T>
struct LstmBackward {
  T d_i, d_f, d_g, d_o, grad_c_prev;
};
template <typename T>
__device__ __forceinline__ LstmBackward<T> lstm_backward(T i, T f, T g, T o, T c_prev, T c_next, T dh, T dc_next) {
  const T tanh_c = gate_tanh(c_next);
  const T dc = dc_next + dh * o * (T(1) - tanh_c * tanh_c);
  LstmBackward<T> out;
  out.grad_c_prev = dc * f;
  out.d_i = dc * g * i * (T(1) - i);
  out.d_f = dc * c_prev * f * (T(1) - f);
  out.d_g = dc * i * (T(1) - g * g);
  out.d_o = dh * tanh_c * o * (T(1) - o);
  return out;
}

// GRU: from W_ih x + b_ih (input_*) and W_hh h + b_hh (hidden_*) of each gate.
template <typename T>
struct GruForward {
  T r, z, n, hidden_n, h;
};
template <typename T>
__device__ __forceinline__ GruForward<T> gru_forward(T input_r, T input_z, T input_n, T hidden_r, T hidden_z,
                                                     T hidden_n, T h_prev) {
  GruForward<T> out;
  out.r = gate_sigmoid(input_r + hidden_r);
  out.z = gate_sigmoid(input_z + hidden_z);
  out.hidden_n = hidden_n;
  out.n = gate_tanh(input_n + out.r * hidden_n);
  out.h = (T(1) - out.z) * out.n + out.z * h_prev;
  return out;
}

// GRU backward: pre-activation gradients (d_r, d_z, d_n of the input side; the hidden
// side's n gradient is d_n * r) and the direct gradient dh * z reaching h_prev.
template <typename T>
struct GruBackward {
  T d_r, d_z, d_n, direct;
};
template <typename T>
__device__ __forceinline__ GruBackward<T> gru_backward(T r, T z, T n, T hidden_n, T h_prev, T dh) {
  GruBackward<T> out;
  out.d_n = dh * (T(1) - z) * (T(1) - n * n);
  out.d_z = dh * (h_prev - n) * z * (T(1) - z);
  out.d_r = out.d_n * hidden_n * r * (T(1) - r);
  out.direct = dh * z;
  return out;
}

}  // namespace cuda
}  // namespace fastattn
