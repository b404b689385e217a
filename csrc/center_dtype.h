// The dtypes a local-p window center may have, in every backend's argument checks (as
// fastattn.functional.attention_inputs.center_dtypes): the query's, or float32 for a
// float16 / bfloat16 query, whose 8 or 11 bits cannot place p_t past 256 or 2048
// (bfloat16 rounds 365.4 to 366).
#pragma once

#include <c10/core/ScalarType.h>

namespace fastattn {

inline bool is_center_dtype(c10::ScalarType center, c10::ScalarType query) {
  return center == query || (center == c10::kFloat && (query == c10::kHalf || query == c10::kBFloat16));
}

}  // namespace fastattn
