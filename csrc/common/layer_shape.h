// The sizes of one LSTM/GRU layer direction as the CPU and CUDA layer drivers take them:
// x (T, B, I), the states (B, H).  Framework-free, for both.
#pragma once

#include <stdint.h>

namespace fastattn {

struct LayerShape {
  int64_t T, B, I, H;

  // The time steps a driver walks: all T, or none when a step has no state to update
  // (B = 0 or H = 0), so that an empty batch of a huge T returns at once.
  int64_t steps_to_run() const { return B * H > 0 ? T : 0; }
};

}  // namespace fastattn
