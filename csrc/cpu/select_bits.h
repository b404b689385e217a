// Branch-free selects on floats for the CPU kernels' loops, so that GCC vectorises them: a
// `?:` on floats followed by arithmetic becomes control flow and stops the vectoriser.
// The functors are the Select / Min / Max arguments of fast_tanh_with and
// fast_sigmoid_with / exp_of_nonpositive_with (csrc/common).
#pragma once

#include <cstdint>
#include <cstring>

namespace fastattn {

// if_true where condition else if_false, as bit masks.
inline float select_bits(bool condition, float if_true, float if_false) {
  std::uint32_t true_bits, false_bits;
  std::memcpy(&true_bits, &if_true, sizeof(float));
  std::memcpy(&false_bits, &if_false, sizeof(float));
  const std::uint32_t mask = 0u - static_cast<std::uint32_t>(condition);
  const std::uint32_t bits = (true_bits & mask) | (false_bits & ~mask);
  float result;
  std::memcpy(&result, &bits, sizeof(float));
  return result;
}
// The clamps of fast_tanh, passing a NaN in `a` through (tanh(NaN) is NaN: a NaN gate input
// makes the state NaN, as torch's cells do, not 0 or -1).
struct SelectMin {
  float operator()(float a, float b) const { return select_bits(b < a, b, a); }
};
struct SelectMax {
  float operator()(float a, float b) const { return select_bits(b > a, b, a); }
};
struct SelectBits {
  float operator()(bool condition, float if_true, float if_false) const {
    return select_bits(condition, if_true, if_false);
  }
};

}  // namespace fastattn
