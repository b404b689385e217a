// sampling_math.h: the position rules of hard attention (sample_positions in
// csrc/ops.cpp), written once for the CPU kernel (csrc/cpu/attention.cpp) and the CUDA
// kernel (csrc/cuda/sample_positions.cu).  `to_double` converts one weight (any float
// type, host or device) to double; the sums run in double.
#pragma once

#include <stdint.h>

#include "fast_tanh.h"  // FASTATTN_HOST_DEVICE

namespace fastattn {

// The first j whose running sum of positive weights exceeds u * total (never a
// zero-weight position); 0 for a row without positive weight or with an infinite sum.
template <typename T, typename ToDouble>
FASTATTN_HOST_DEVICE int64_t draw_position(const T* weights, int64_t size, double uniform, ToDouble to_double) {
  double total = 0.0;
  for (int64_t j = 0; j < size; ++j) {
    const double weight = to_double(weights[j]);
    if (weight > 0.0) total += weight;
  }
  if (!(total > 0.0) || !(total - total == 0.0)) return 0;  // no positive weight, or inf / NaN
  const double target = uniform * total;
  double running = 0.0;
  int64_t last_positive = 0;
  for (int64_t j = 0; j < size; ++j) {
    const double weight = to_double(weights[j]);
    if (!(weight > 0.0)) continue;
    last_positive = j;
    running += weight;
    if (running > target) return j;
  }
  return last_positive;  // rounding left target just above the running total
}

// The first position of the largest weight.
template <typename T, typename ToDouble>
FASTATTN_HOST_DEVICE int64_t argmax_position(const T* weights, int64_t size, ToDouble to_double) {
  int64_t best = 0;
  for (int64_t j = 1; j < size; ++j) {
    if (to_double(weights[j]) > to_double(weights[best])) best = j;
  }
  return best;
}

}  // namespace fastattn
