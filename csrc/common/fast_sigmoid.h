// fast_sigmoid: the float32 sigmoid of the LSTM/GRU gates, 1 / (1 + e^-x), accurate
// relative to its value over the whole real line, usable from C++ (scalar loops that
// the compiler vectorises) and CUDA (__host__ __device__); and its exponential,
// exp_of_nonpositive_with, which the CPU attention backward's softmax rows also use.
//
//   e = exp(-|x|), in (0, 1]: 2^n exp(r) with n = round(-|x| log2(e)) and
//       r = -|x| - n ln(2) (ln 2 in two parts, Cody-Waite), exp(r) by its Taylor series
//       to degree 7 (|r| <= ln(2) / 2: truncation below 6e-9 relative), 2^n as two
//       exponent-field scalings so that n reaches -150 (denormal results);
//   sigmoid = 1 / (1 + e) for x >= 0 and e / (1 + e) below: nothing cancels on either
//       side.  (1 + tanh(x / 2)) / 2, used before, rounded away everything under 1's
//       spacing: sigmoid(-10) with a relative error of 4.6e-4, sigmoid(-18) = 0.
// NaN gives NaN, +inf 1, -inf 0.  No exp from libm and no branch: 3 FMAs of range
// reduction, 7 of polynomial, a few integer operations and one division (on the GPU
// the Newton reciprocal of fast_tanh.h, no special-function unit).  The max relative
// error is checked in tests/test_cpu_recurrent.py on a dense grid through the CPU
// cells, and through the CUDA cells in tests/test_cuda_kernels.py.
#pragma once

#include <stdint.h>

#include "fast_tanh.h"

namespace fastattn {

// select(condition, a, b): a where condition holds, else b.
struct TernarySelect {
  FASTATTN_HOST_DEVICE float operator()(bool condition, float if_true, float if_false) const {
    return condition ? if_true : if_false;
  }
};

// 2^k for k in [-126, 127], built in the exponent field.
FASTATTN_HOST_DEVICE float power_of_two(int32_t k) { return float_of_bits(static_cast<uint32_t>(k + 127) << 23); }

// e^y for y <= 0: 2^n exp(r) as described above; y below -104 is taken as -104 (e^-104 =
// 7e-46 rounds to 0 or the smallest denormal), NaN gives NaN.  Select: a functor as
// TernarySelect; the CPU passes a bit-mask select, which keeps GCC's vectoriser on the loop.
template <typename Select>
FASTATTN_HOST_DEVICE float exp_of_nonpositive_with(float y, Select select) {
  constexpr float kLog2E = 1.44269504088896341f;
  constexpr float kLn2High = 0.693145751953125f;  // few significant bits: n * kLn2High is exact
  constexpr float kLn2Low = 1.42860682030941723e-6f;
  constexpr float kRoundingShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kFloor = -104.0f;              // exp(-104) = 7e-46 rounds to 0
  y = select(y < kFloor, kFloor, y);             // NaN stays NaN
  const float shifted = y * kLog2E + kRoundingShift;
  const float n = shifted - kRoundingShift;
  const float r = (y - n * kLn2High) - n * kLn2Low;
  float series = 1.0f / 5040.0f;
  series = series * r + 1.0f / 720.0f;
  series = series * r + 1.0f / 120.0f;
  series = series * r + 1.0f / 24.0f;
  series = series * r + 1.0f / 6.0f;
  series = series * r + 0.5f;
  series = series * r + 1.0f;
  series = series * r + 1.0f;
  // n in [-151, 0] as an integer (shifted stays in [2^23, 2^24), one unit a step).
  const int32_t exponent = static_cast<int32_t>(bits_of_float(shifted) - bits_of_float(kRoundingShift));
  const int32_t half = exponent >> 1;
  return series * power_of_two(half) * power_of_two(exponent - half);
}

template <typename Select>
FASTATTN_HOST_DEVICE float fast_sigmoid_with(float x, Select select) {
  const float e = exp_of_nonpositive_with(select(x < 0.0f, x, -x), select);  // e^-|x|
  const float positive = divide_rational(1.0f, 1.0f + e);
  return select(x < 0.0f, e * positive, positive);
}

FASTATTN_HOST_DEVICE float fast_sigmoid(float x) { return fast_sigmoid_with(x, TernarySelect{}); }

}  // namespace fastattn
