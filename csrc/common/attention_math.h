// attention_math.h: the scalar maths of fused soft attention, written once for the
// CPU kernels (csrc/cpu/attention.cpp) and the CUDA kernels (csrc/cuda/).
//
//   e_{t,j}     = score(q_t, k_j)          dot, cosine or additive (ScoreKind)
//   alpha_{t,j} = softmax_j(e_{t,j})       over the keys t may see (key_range,
//                                          minus key_padding_mask), online
//   w_{t,j}     = alpha_{t,j} * g_{t,j}    g = exp(-(j - p_t)^2 / (2 sigma^2)),
//                                          sigma = window / 2, when Gaussian
//
// Plain templates on the accumulation type (float or double) with
// FASTATTN_HOST_DEVICE, no torch includes.  The vectorised inner loops over the
// feature dimension live with each backend; what is here is per element or per key.
#pragma once

#include <math.h>
#include <stdint.h>

#include "fast_tanh.h"

namespace fastattn {

enum class ScoreKind : int { kDot = 0, kCosine = 1, kAdditive = 2 };

// ---------------------------------------------------------------- elementary maths

FASTATTN_HOST_DEVICE float exp_of(float x) { return ::expf(x); }
FASTATTN_HOST_DEVICE double exp_of(double x) { return ::exp(x); }
FASTATTN_HOST_DEVICE float log_of(float x) { return ::logf(x); }
FASTATTN_HOST_DEVICE double log_of(double x) { return ::log(x); }
FASTATTN_HOST_DEVICE float ceil_of(float x) { return ::ceilf(x); }
FASTATTN_HOST_DEVICE double ceil_of(double x) { return ::ceil(x); }
FASTATTN_HOST_DEVICE float floor_of(float x) { return ::floorf(x); }
FASTATTN_HOST_DEVICE double floor_of(double x) { return ::floor(x); }

// Lane-wise min / max that return a NaN first operand as is (one min/max
// instruction on SIMD lanes), so that tanh_of(NaN) is NaN as torch.tanh's is, on
// scalars and on every SIMD lane alike.
struct PropagatingMin {
  template <typename T>
  FASTATTN_HOST_DEVICE T operator()(T a, T b) const { return a > b ? b : a; }
};
struct PropagatingMax {
  template <typename T>
  FASTATTN_HOST_DEVICE T operator()(T a, T b) const { return a < b ? b : a; }
};

// The additive score's tanh: the project's rational approximation in float32
// (speed; max abs error 4e-7), the libm tanh in float64 (accuracy).
FASTATTN_HOST_DEVICE float tanh_of(float x) { return fast_tanh_with(x, PropagatingMin{}, PropagatingMax{}); }
FASTATTN_HOST_DEVICE double tanh_of(double x) { return ::tanh(x); }

// max(running, score) that keeps a NaN: NaN once either is NaN, so that a NaN score
// makes its row NaN (as the reference's softmax does) instead of being skipped.
template <typename Real>
FASTATTN_HOST_DEVICE Real nan_or_max(Real running, Real score) {
  if (running != running) return running;
  return score > running || score != score ? score : running;
}

template <typename Real>
FASTATTN_HOST_DEVICE Real negative_infinity() {
  return -static_cast<Real>(INFINITY);
}

// The cosine score's norm floor, fastattn.reference.scores.COSINE_NORM_FLOOR (as
// torch.nn.functional.cosine_similarity's eps): a zero vector's gradient, 1 / floor times
// the upstream one, stays finite.  The reference floors float16 norms at float16's
// smallest normal number instead (1 / 1e-8 overflows float16): the CPU and CUDA kernels
// pass that floor to clamped_norm and unit_vector_gradient for float16 inputs.
template <typename Real>
FASTATTN_HOST_DEVICE constexpr Real cosine_norm_floor() {
  return Real(1e-8);
}

// ---------------------------------------------------------------- which keys a query sees

// The keys [begin, end) that query t may attend to before key_padding_mask:
// j < length (lengths[n], or S without lengths), j <= t when causal, and
// center - window <= j <= center + window for local attention (window >= 0;
// window < 0 means global).  The window bounds are computed in Real and compared
// with j as the reference compares them (in the center's dtype); a NaN center
// gives an empty range.  Local-m passes center = t.
struct KeyRange {
  int64_t begin;
  int64_t end;
  FASTATTN_HOST_DEVICE bool empty() const { return begin >= end; }
  FASTATTN_HOST_DEVICE bool contains(int64_t j) const { return j >= begin && j < end; }
};

template <typename Real>
FASTATTN_HOST_DEVICE KeyRange key_range(int64_t t, int64_t source_length, int64_t length, bool causal,
                                        int64_t window, Real center) {
  int64_t begin = 0;
  int64_t end = length < source_length ? length : source_length;
  if (end < 0) end = 0;
  if (causal && t + 1 < end) end = t + 1;
  if (window >= 0) {
    const Real lowest = center - static_cast<Real>(window);
    const Real highest = center + static_cast<Real>(window);
    if (!(lowest <= highest)) return KeyRange{0, 0};
    const Real first = ceil_of(lowest);  // j >= lowest  <=>  j >= ceil(lowest)
    const Real last = floor_of(highest);  // j <= highest <=>  j <= floor(highest)
    if (first > static_cast<Real>(begin)) {
      begin = first >= static_cast<Real>(end) ? end : static_cast<int64_t>(first);
    }
    if (last + Real(1) < static_cast<Real>(end)) {
      end = last < static_cast<Real>(begin) ? begin : static_cast<int64_t>(last) + 1;
    }
  }
  if (end < begin) end = begin;
  return KeyRange{begin, end};
}

// The whole mask predicate: may query t (whose range is `range`) attend to key j?
FASTATTN_HOST_DEVICE bool key_is_visible(KeyRange range, int64_t j, bool is_padding) {
  return range.contains(j) && !is_padding;
}

// ---------------------------------------------------------------- local-p Gaussian

// g = exp(-(j - p)^2 / (2 sigma^2)), sigma = window / 2 (Luong 2015, eq. 10).
template <typename Real>
FASTATTN_HOST_DEVICE Real gaussian_factor(int64_t j, Real center, int64_t window) {
  const Real sigma = static_cast<Real>(window) / Real(2);
  const Real offset = static_cast<Real>(j) - center;
  return exp_of(-(offset * offset) / (Real(2) * sigma * sigma));
}

// dg/dp / g = (j - p) / sigma^2.
template <typename Real>
FASTATTN_HOST_DEVICE Real gaussian_log_slope(int64_t j, Real center, int64_t window) {
  const Real sigma = static_cast<Real>(window) / Real(2);
  return (static_cast<Real>(j) - center) / (sigma * sigma);
}

// ---------------------------------------------------------------- online softmax

// Running max and sum of exp(score - max) over the keys seen so far.  Feed it
// blocks of scores: raise_max(block max) first, multiply whatever was accumulated
// with the old max (the context) by the factor it returns, then add() each score.
template <typename Acc, typename Sum = Acc>
struct OnlineSoftmax {
  Acc max_score;
  Sum sum;  // a wider Sum (the CPU kernels' double) keeps a long row's sum of S terms exact

  FASTATTN_HOST_DEVICE OnlineSoftmax() : max_score(negative_infinity<Acc>()), sum(Sum(0)) {}

  // -> the factor (<= 1) that rescales sums built on the previous max.  A NaN block max
  // (a NaN score) stays the max: every later probability, the sum and the row are NaN.
  FASTATTN_HOST_DEVICE Acc raise_max(Acc block_max) {
    if (!(block_max > max_score) && block_max == block_max) return Acc(1);
    const Acc factor = max_score == negative_infinity<Acc>() ? Acc(0) : exp_of(max_score - block_max);
    sum *= factor;
    max_score = block_max;
    return factor;
  }

  // score <= max_score; -> exp(score - max_score), the unnormalised probability.
  FASTATTN_HOST_DEVICE Acc add(Acc score) {
    const Acc probability = exp_of(score - max_score);
    sum += probability;
    return probability;
  }

  // No key seen: a fully masked row (zero context, zero weights, lse = -inf).  A NaN sum
  // (a NaN or +inf score) is not empty: it reaches the outputs, as in the reference.
  FASTATTN_HOST_DEVICE bool empty() const { return sum == Sum(0); }

  FASTATTN_HOST_DEVICE Acc logsumexp() const {
    return empty() ? negative_infinity<Acc>() : max_score + static_cast<Acc>(log_of(sum));
  }
};

// ---------------------------------------------------------------- merging key splits

// A row whose keys were split over blocks: split s left its softmax max m_s, sum l_s
// and unnormalised context C_s = sum_{j in s} exp(e_j - m_s) v_j.  The row's
//   M = max_s m_s,   L = sum_s exp(m_s - M) l_s,   context = sum_s exp(m_s - M) / L * C_s.
// split_max(s) and split_sum(s) load m_s and l_s (each kernel with its own cache hint).
template <typename Acc>
struct MergedSplits {
  Acc max_score;
  Acc sum;

  template <typename SplitMax, typename SplitSum>
  FASTATTN_HOST_DEVICE MergedSplits(int64_t splits, SplitMax split_max, SplitSum split_sum)
      : max_score(negative_infinity<Acc>()), sum(Acc(0)) {
    for (int64_t s = 0; s < splits; ++s) {
      const Acc m = split_max(s);
      max_score = m > max_score || m != m ? m : max_score;  // NaN once a split's is NaN
    }
    if (max_score == negative_infinity<Acc>()) return;
    for (int64_t s = 0; s < splits; ++s) {
      const Acc m = split_max(s);
      if (m != negative_infinity<Acc>()) sum += exp_of(m - max_score) * split_sum(s);
    }
  }

  // No split saw a key: a fully masked row (zero context, zero weights, lse = -inf).  A
  // NaN sum is not empty (see OnlineSoftmax::empty).
  FASTATTN_HOST_DEVICE bool empty() const { return sum == Acc(0); }

  // exp(m_s - M), split s's unnormalised context rescaled to the merged max (a partial
  // merge, itself merged later); 0 for a split that saw no key.
  FASTATTN_HOST_DEVICE Acc rescale(Acc split_max) const {
    return split_max == negative_infinity<Acc>() ? Acc(0) : exp_of(split_max - max_score);
  }

  // exp(m_s - M) / L, the factor of split s's context; 0 for an empty row or split.
  FASTATTN_HOST_DEVICE Acc context_factor(Acc split_max) const { return empty() ? Acc(0) : rescale(split_max) / sum; }

  // A key's weight exp(e - M) / L from its raw score e (-inf for a masked key: 0).
  FASTATTN_HOST_DEVICE Acc weight(Acc score) const {
    return empty() || score == negative_infinity<Acc>() ? Acc(0) : exp_of(score - max_score) / sum;
  }

  FASTATTN_HOST_DEVICE Acc logsumexp() const {
    return empty() ? negative_infinity<Acc>() : max_score + log_of(sum);
  }
};

// ---------------------------------------------------------------- scores, scalar forms

// e = scale * q.k
template <typename Acc>
FASTATTN_HOST_DEVICE Acc dot_score(const Acc* query, const Acc* key, int64_t dim, Acc scale) {
  Acc sum = Acc(0);
  for (int64_t d = 0; d < dim; ++d) sum += query[d] * key[d];
  return sum * scale;
}

// max(|x|, floor), the reference's x.norm().clamp_min(floor).
template <typename Acc>
FASTATTN_HOST_DEVICE Acc clamped_norm(Acc norm, Acc floor = cosine_norm_floor<Acc>()) {
  return norm < floor ? floor : norm;
}

// e = scale * (q / max(|q|, floor)) . (k / max(|k|, floor)), given the unit query
// and |k|: scale * (unit_query . k) / max(|k|, floor).
template <typename Acc>
FASTATTN_HOST_DEVICE Acc cosine_score(const Acc* unit_query, const Acc* key, Acc key_norm, int64_t dim,
                                      Acc scale) {
  Acc sum = Acc(0);
  for (int64_t d = 0; d < dim; ++d) sum += unit_query[d] * key[d];
  return scale * (sum / clamped_norm(key_norm));
}

// e = v . tanh(q_b + k), q_b = q + bias (projections already applied).
template <typename Acc>
FASTATTN_HOST_DEVICE Acc additive_score(const Acc* query_plus_bias, const Acc* key, const Acc* v, int64_t dim) {
  Acc sum = Acc(0);
  for (int64_t d = 0; d < dim; ++d) sum += v[d] * tanh_of(query_plus_bias[d] + key[d]);
  return sum;
}

// ---------------------------------------------------------------- backward pieces

// de_j = alpha_j (dalpha_j - sum_i alpha_i dalpha_i)
template <typename Acc>
FASTATTN_HOST_DEVICE Acc softmax_score_gradient(Acc alpha, Acc grad_alpha, Acc row_dot) {
  return alpha * (grad_alpha - row_dot);
}

// d tanh(x)/dx from u = tanh(x).
template <typename Acc>
FASTATTN_HOST_DEVICE Acc tanh_derivative(Acc u) {
  return Acc(1) - u * u;
}

// Backward of u = x / max(|x|, floor):  dx = du / c - [|x| >= floor] (du.x) x / (c^2 |x|),
// c = max(|x|, floor), exactly the autograd of the reference (the clamp passes no
// gradient to the norm below floor, and the norm none at 0).  Taken as dx = a (du + b x)
// with a = 1 / c and b = -((du.x) / c) / |x|: b x is of the size of du, where the
// factor (du.x) / (c^2 |x|), of the size of |du| / |x|^2, overflows for |x| below ~5e-20
// in float32 (1e-154 in float64), norms at which the reference's gradients are finite.
template <typename Acc>
struct UnitVectorGradient {
  Acc inverse_norm;  // a
  Acc along_input;   // b
  FASTATTN_HOST_DEVICE Acc of(Acc grad_unit, Acc input) const {
    return inverse_norm * (grad_unit + along_input * input);
  }
};

template <typename Acc>
FASTATTN_HOST_DEVICE UnitVectorGradient<Acc> unit_vector_gradient(Acc norm, Acc gradient_dot_input,
                                                                  Acc floor = cosine_norm_floor<Acc>()) {
  const Acc clamped = clamped_norm(norm, floor);
  const Acc along_input = norm >= floor ? -(gradient_dot_input / clamped) / norm : Acc(0);
  return UnitVectorGradient<Acc>{Acc(1) / clamped, along_input};
}

// ---------------------------------------------------------------- softmax backward row terms

// A row's softmax backward from its recomputed scores alone.  With x_j = g_j dw_j (dw_j
// the gradient reaching weight j, g_j the Gaussian factor) the score gradient
//   de_j = p_j (x_j - sum_i p_i x_i)
// is taken as p_j ((x_j - s) - r), s = x_m of the most probable key m and
// r = sum_i p_i (x_i - s): the same, as the p_i add up to 1, but exact at m and free of
// the cancellation of two near-equal sums elsewhere (a peaked row), as the CPU kernels'
// ShiftedRowTerm.  p_j = exp(e_j - M) / L from the row's own max M and sum L, so that
// the most probable key's p is 1 / L, as the forward's weight, whatever the rounding of
// logsumexp.
template <typename Acc>
struct RowTerms {
  Acc max_score;  // M
  Acc sum;        // L = sum_j exp(e_j - M); 0: no key (a fully masked row)
  Acc shift;      // s
  Acc row_term;   // r
  FASTATTN_HOST_DEVICE bool empty() const { return sum == Acc(0); }
  FASTATTN_HOST_DEVICE Acc probability(Acc score) const { return exp_of(score - max_score) / sum; }
  FASTATTN_HOST_DEVICE Acc score_gradient(Acc probability, Acc grad_weight) const {
    return softmax_score_gradient(probability, grad_weight - shift, row_term);
  }
};

// RowTerms over a row's keys in one pass, in pieces merged in key order (tiles, key
// splits): the max M, the sum L and sum_j exp(e_j - M) (x_j - s) are rescaled when a
// larger score comes, s moved to its key's x (first on ties).  center_sum gathers the
// local-p center's gradient, sum_j exp(e_j - M) x_j (j - c) / sigma^2 (times L).  A NaN
// score makes M and the whole row NaN; a key scored -inf (masked) adds nothing.
template <typename Acc>
struct OnlineRowTerms {
  Acc max_score;
  Acc sum;
  Acc shift;
  Acc shifted_sum;  // sum_j exp(e_j - M) (x_j - s)
  Acc center_sum;

  FASTATTN_HOST_DEVICE OnlineRowTerms()
      : max_score(negative_infinity<Acc>()), sum(Acc(0)), shift(Acc(0)), shifted_sum(Acc(0)), center_sum(Acc(0)) {}

  FASTATTN_HOST_DEVICE static OnlineRowTerms of_key(Acc score, Acc grad_weight, Acc center_term) {
    OnlineRowTerms key;
    if (score == negative_infinity<Acc>()) return key;
    key.max_score = score;
    key.sum = Acc(1);
    key.shift = grad_weight;
    key.center_sum = center_term;
    return key;
  }

  // Adds the keys of `later`, which all come after this one's.
  FASTATTN_HOST_DEVICE void merge(const OnlineRowTerms& later) {
    if (later.max_score == negative_infinity<Acc>()) return;
    if (max_score == negative_infinity<Acc>()) {
      *this = later;
      return;
    }
    const Acc merged_max = nan_or_max(max_score, later.max_score);
    const Acc mine = exp_of(max_score - merged_max), theirs = exp_of(later.max_score - merged_max);
    const Acc merged_shift = later.max_score > max_score ? later.shift : shift;
    shifted_sum = mine * (shifted_sum + (shift - merged_shift) * sum) +
                  theirs * (later.shifted_sum + (later.shift - merged_shift) * later.sum);
    sum = mine * sum + theirs * later.sum;
    center_sum = mine * center_sum + theirs * later.center_sum;
    shift = merged_shift;
    max_score = merged_max;
  }

  // A key scored +inf makes the row's softmax NaN (exp(inf - inf)), as the reference's and
  // the CPU op's, even where every other key scores -inf (skipped above as masked).
  FASTATTN_HOST_DEVICE bool infinite() const { return max_score == -negative_infinity<Acc>(); }
  FASTATTN_HOST_DEVICE RowTerms<Acc> finish() const {
    if (infinite()) {
      const Acc nan = max_score - max_score;
      return {nan, nan, nan, nan};
    }
    return {max_score, sum, shift, sum == Acc(0) ? Acc(0) : shifted_sum / sum};
  }
  FASTATTN_HOST_DEVICE Acc center_gradient() const {
    if (infinite()) return max_score - max_score;
    return sum == Acc(0) ? Acc(0) : center_sum / sum;
  }
};

}  // namespace fastattn
