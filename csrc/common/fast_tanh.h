// fast_tanh: tanh(x) as one rational function, usable from C++ (scalars and
// at::vec::Vectorized lanes) and CUDA (__host__ __device__).
//
//   tanh(x) ~= x * P(x^2) / Q(x^2) for |x| <= 8.75, exactly +-1 beyond,
//   P of degree 4 and Q of degree 4 in x^2, fitted by iteratively reweighted
//   least squares (Lawson) on [0, 8.75] for this project.
//
// Max absolute error against tanh, evaluated in float32: 3.0e-7 (about 5 ulp of
// 1.0) over the whole real line; relative error near 0 below 1e-7.  Cost: 10 FMAs,
// one division, a subtraction and two clamps; no exp, so it runs on the FMA units, not the
// special-function unit.  The division: a true one on the CPU (SIMD lanes divide in
// one instruction); on the GPU and under its CPU emulation (FASTATTN_CUDA_EMULATION)
// P times 1/Q by three Newton steps from an exponent-flipping seed (Q lies in
// [1, 365]: seed error < 12%, then 1.4e-2, 2e-4, 4e-8), 7 more FMA-unit
// instructions and no special-function one, where div.rn.f32 is a branchy sequence
// and rcp.approx an SFU op; its max absolute error, computed in float32 on a dense
// grid: 3.4e-7 without fused multiply-adds (the emulation), 3.1e-7 with them.  tests/test_cpu_attention.py checks the CPU form's bound
// and tests/test_cuda_kernels.py the GPU form's (emulated, and on the device), both
// on a dense grid.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define FASTATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTATTN_HOST_DEVICE inline
#endif

namespace fastattn {

constexpr float kFastTanhClamp = 8.75f;
constexpr float kFastTanhSaturate = 16777216.0f;  // 2^24: one float32 step past the clamp reaches +-1
constexpr float kFastTanhMaxAbsError = 4.0e-7f;  // the bound the test checks (measured: 3.0e-7)

// The bits of a float32 and back (the exponent-field tricks of the reciprocal seed
// below and of fast_sigmoid.h's powers of two).
FASTATTN_HOST_DEVICE uint32_t bits_of_float(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;  // the compiler's own memcpy: no <string.h> (framework-free headers)
  __builtin_memcpy(&bits, &value, sizeof bits);
  return bits;
#endif
}

FASTATTN_HOST_DEVICE float float_of_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  __builtin_memcpy(&value, &bits, sizeof value);
  return value;
#endif
}

// numerator / denominator for the rational function (denominator in [1, 365]).
template <typename T>
FASTATTN_HOST_DEVICE T divide_rational(T numerator, T denominator) {
  return numerator / denominator;
}
#if defined(__CUDA_ARCH__) || defined(FASTATTN_CUDA_EMULATION)
FASTATTN_HOST_DEVICE float divide_rational(float numerator, float denominator) {
  constexpr uint32_t kSeed = 0x7EF311C3u;  // 1/x ~= bits(kSeed - bits(x)) within 12%
  float reciprocal = float_of_bits(kSeed - bits_of_float(denominator));
  for (int step = 0; step < 3; ++step) reciprocal = reciprocal + reciprocal * (1.0f - denominator * reciprocal);
  return numerator * reciprocal;
}
#endif

// T: float, double or a SIMD vector type with +, *, / and the two clamp helpers.
template <typename T, typename Min, typename Max>
FASTATTN_HOST_DEVICE T fast_tanh_with(T x, Min minimum, Max maximum) {
  const T clamped = minimum(maximum(x, T(-kFastTanhClamp)), T(kFastTanhClamp));
  const T y = clamped * clamped;
  T numerator = T(1.363577892e-08f);
  numerator = numerator * y + T(2.079633868e-05f);
  numerator = numerator * y + T(3.506309020e-03f);
  numerator = numerator * y + T(1.338982832e-01f);
  numerator = numerator * y + T(9.999999282e-01f);
  T denominator = T(7.886948043e-07f);
  denominator = denominator * y + T(3.303629924e-04f);
  denominator = denominator * y + T(2.591708221e-02f);
  denominator = denominator * y + T(4.672313322e-01f);
  denominator = denominator * y + T(1.0f);
  // Past the clamp, x - clamped (0 inside it) pushes the value beyond +-1, so that the
  // clamp below returns exactly +-1 there, as float32 tanh does from |x| = 9.01 on (the
  // rational function ends at 1 - 1.2e-7 at the clamp; left there, sigmoid(x) stayed
  // 6e-8 from 0 and 1 and saturated units kept a gradient).  The rational function
  // overshoots 1 by < 1e-7 just below the clamp.
  const T value = clamped * divide_rational(numerator, denominator) + (x - clamped) * T(kFastTanhSaturate);
  return minimum(maximum(value, T(-1.0f)), T(1.0f));
}

// min/max that pass a NaN in their first argument through (tanh(NaN) is NaN).
struct ScalarMin {
  template <typename T>
  FASTATTN_HOST_DEVICE T operator()(T a, T b) const { return b < a ? b : a; }
};
struct ScalarMax {
  template <typename T>
  FASTATTN_HOST_DEVICE T operator()(T a, T b) const { return b > a ? b : a; }
};

FASTATTN_HOST_DEVICE float fast_tanh(float x) { return fast_tanh_with(x, ScalarMin{}, ScalarMax{}); }

}  // namespace fastattn
