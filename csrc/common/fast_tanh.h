// fast_tanh: tanh(x) as one rational function, usable from C++ (scalars and
// at::vec::Vectorized lanes) and CUDA (__host__ __device__).
//
//   tanh(x) ~= x * P(x^2) / Q(x^2) for |x| < 8.75, clamped to +-1 beyond,
//   P of degree 4 and Q of degree 4 in x^2, fitted by iteratively reweighted
//   least squares (Lawson) on [0, 8.75] for this project.
//
// Max absolute error against tanh, evaluated in float32: 3.0e-7 (about 5 ulp of
// 1.0) over the whole real line; relative error near 0 below 1e-7.  The test
// tests/test_cpu_fast_tanh.py checks the bound on a dense grid.  Cost: 9 FMAs,
// one division, one clamp; no exp, so it runs on the FMA units, not the
// special-function unit.
#pragma once

#if defined(__CUDACC__)
#define FASTATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTATTN_HOST_DEVICE inline
#endif

namespace fastattn {

constexpr float kFastTanhClamp = 8.75f;
constexpr float kFastTanhMaxAbsError = 4.0e-7f;  // the bound the test checks (measured: 3.0e-7)

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
  const T value = clamped * numerator / denominator;
  // The rational function overshoots 1 by < 1e-7 just below the clamp.
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
