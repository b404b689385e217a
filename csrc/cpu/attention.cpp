// CPU kernels of the fused soft-attention ops declared in csrc/ops.cpp:
// attention_forward, attention_backward, sample_positions and fast_tanh.
//
// Fuses: score (dot / cosine / additive) -> mask (lengths, key_padding_mask, causal,
//   window) -> softmax -> optional Gaussian factor -> context, in one pass over
//   the keys per query row.  The additive score evaluates v . tanh(q + k + b)
//   over Da on the fly for each (t, j): no (N, T, S, Da) tensor ever exists, and
//   no (N, T, S) tensor unless the weights are asked for.
// Forward: parallel over the N*T query rows (at::parallel_for).  A row visits only
//   the keys in its [begin, end) range (lengths, causal, window; padded keys are
//   skipped), computes their scores into a thread-local S-sized buffer in blocks
//   of kKeyBlock keys, and folds each block into the online softmax and a
//   Dv-sized context accumulator.  Weights are written from the buffered scores
//   once the row's max and sum are known.  Memory beyond the outputs:
//   O(threads * (S + D + Dv)), plus the (N, S) key norms for the cosine score.
//   at::parallel_for is ATen's OpenMP backend, inlined from its headers: the rows
//   run in parallel only when this file is compiled (and linked) with -fopenmp;
//   without it every parallel_for here runs on one thread.
// BLAS path (score dot / cosine, at least 16 keys, enough work and query rows a key for
//   the dtype, most (t, j) pairs visible: use_blas_path, which the forward and the
//   backward answer each for itself):
//   the forward's contractions are GEMMs (scores = q' k^T, context = weights @
//   values; float32: brgemm tiles a batch element, batched_matmul_into in
//   csrc/cpu/tile_gemm.h; float64: at::bmm) around one C++ pass per row for scale,
//   masks, the softmax (the per-row kernels' row_exp and double sums), logsumexp and
//   the Gaussian factor (blas_softmax_rows); the dot backward is five GEMMs around one
//   pass per row (cosine: on the unit vectors, then through them).  Both run a block of about 2^20 scores at a time
//   (for_each_score_block): a block's GEMMs, then its row passes while it is in cache,
//   then the GEMMs that take its W and dE, so no (N, T, S) tensor exists but the weights
//   asked for (the keys' and values' gradients of an element whose rows are split are
//   added up over its blocks).  bfloat16 with the dot or cosine score on a CPU with
//   AVX512-BF16: the GEMMs take the bfloat16 inputs as they are
//   (PreparedInputs::bfloat16_gemms), their scores in float32, W and dE rounded to
//   bfloat16 row by row for the GEMMs after (in the backward over all rows at once, on
//   (N, T, S) bfloat16 W and dE, where an element's rows are split over blocks or the
//   keys are shared by the batch).  The row passes vectorise where a row's visible keys
//   are one range (no padding mask), in the AVX2 clone too (run_for_this_cpu).
// Backward: parallel over n (each n owns its grad_keys / grad_values rows; chunk-
//   local grad_v / grad_bias summed at the end): no races, deterministic.  Scores
//   and tanh are recomputed, never stored: per row a pass over the keys for their
//   probabilities (normalised over the row, probabilities_of_row: the saved
//   logsumexp only marks fully masked rows) and the softmax's row term, shifted by the
//   most probable key's so that peaked rows cancel exactly (ShiftedRowTerm), then one
//   for the gradients.  The additive score keeps each key's tanh from the first pass for
//   the second where a row's fit (kActivationCacheElements): one tanh a pair there.
//   values_are_keys: a key's value terms go to its gradient row with its key terms
//   (the cosine score's after the unit-key backward); the GEMM path adds the two.
// NaN: a NaN score (a NaN input, or inf - inf) makes its row NaN, as the reference's
//   softmax does; only rows with no visible key are zeros.
// Negligible weights (under 2^-63 of a row's largest in float, 2^-511 in double), whose
//   float32 subnormals cost this CPU an assist an instruction, are left out of the
//   context's sums and of a backward without a weights' gradient; the returned weights
//   keep them (negligible_weight).
// Vectorisation: inner loops over the feature dimension use Simd<T, bytes>
//   vectors (below: why not at::vec::Vectorized), fast_tanh_with on float lanes.
//   Every kernel is compiled for the baseline ISA and with AVX2+FMA, the additive
//   score's row kernels with AVX-512 too (target attributes, no -march flag), and
//   picked at run time from the CPU (csrc/cpu/isa.h; kAvx512RowKernels).
// float16 / bfloat16: computed in float32.  The forward's row kernel reads the keys and
//   values as they are stored, widening each vector of them to float as it loads it
//   (load_lanes); the query, v, bias and center, and for the GEMM paths and the
//   backward the keys and values too, are converted to float32 first; outputs are
//   converted back.  Except the bfloat16 GEMMs of the dot and cosine scores above, whose
//   products are exact and sums float32, but whose W and dE are rounded to bfloat16 (a
//   decode step's W v: bfloat16_decode_context, W in float32, v widened in registers).
// Not handled: float16 / bfloat16 arithmetic.  Keys may be (1, S, D), shared by the
//   batch (location score: W_a[:S]); their gradient is then summed over it (per
//   chunk of the batch, or one GEMM on the BLAS path).  Keys and values may have a
//   batch stride of 0 but need contiguous rows otherwise (else they are copied).
//   Backward parallelism is over n only.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Generator.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/attention_math.h"
#include "../common/fast_sigmoid.h"
#include "../common/sampling_math.h"
#include "../center_dtype.h"
#include "bfloat16_gemm.h"
#include "isa.h"
#include "select_bits.h"
#include "tile_gemm.h"

#if defined(__GNUC__) || defined(__clang__)
#define FASTATTN_ALWAYS_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define FASTATTN_ALWAYS_INLINE __forceinline
#else
#define FASTATTN_ALWAYS_INLINE inline
#endif

namespace {

using fastattn::bfloat16_decode_context;
using fastattn::bfloat16_matmul_nt;
using fastattn::bfloat16_matmul_nt_out;
using fastattn::bfloat16_matmul_nt_available;
using fastattn::KeyRange;
using fastattn::ScoreKind;
using fastattn::IsaClones;
using fastattn::kernel_for_this_cpu;

constexpr int64_t kKeyBlock = 128;  // keys scored before each online-softmax update
// The additive backward keeps a row's S x Da activations between its two passes when
// they fit in a core's L2 (256 KiB in float32), one buffer a thread; above that, taking
// each tanh twice was faster (N = 8, S = 400, Da = 512: 11 ms, cached 16 ms, in one run).
constexpr int64_t kActivationCacheElements = int64_t{1} << 16;
// The backward sums the keys' and the values' gradients over the query rows of a batch
// element in blocks of kRowBlock rows (see backward_batches).
constexpr int64_t kRowBlock = 32;

// ---------------------------------------------------------------- SIMD vectors
// Simd<T, kBytes>: kBytes / sizeof(T) float or double lanes.  Why not
// at::vec::Vectorized directly: an extension TU is compiled without ATen's
// CPU_CAPABILITY flags, so Vectorized is its portable fallback (arrays copied
// through the stack, scalar maths: measured 5x slower than this, and slower still
// inside an AVX2 clone).  With GCC/Clang, Simd wraps a vector-extension type the
// compiler keeps in registers: 16 bytes (SSE2) in the baseline kernels, 32 bytes
// (one ymm register, FMA) in the AVX2 clones, 64 bytes (one zmm register) in the
// AVX-512 ones; 32-byte compares/selects would be split into scalars on SSE2.  Other
// compilers get Vectorized behind the same interface.  Everything here is
// FASTATTN_ALWAYS_INLINE and the kernels are flattened, so it is compiled for the ISA of
// the kernel that calls it.

#if defined(__GNUC__) || defined(__clang__)
template <typename T, int kBytes>
struct NativeVector;
template <>
struct NativeVector<float, 16> {
  typedef float type __attribute__((vector_size(16)));
};
template <>
struct NativeVector<double, 16> {
  typedef double type __attribute__((vector_size(16)));
};
template <>
struct NativeVector<float, 32> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct NativeVector<double, 32> {
  typedef double type __attribute__((vector_size(32)));
};
template <>
struct NativeVector<float, 64> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct NativeVector<double, 64> {
  typedef double type __attribute__((vector_size(64)));
};

template <typename T, int kBytes>
struct Simd {
  using Native = typename NativeVector<T, kBytes>::type;
  using Lane = T;
  Native value;
  static constexpr int64_t size() { return static_cast<int64_t>(sizeof(Native) / sizeof(T)); }
  Simd() = default;
  FASTATTN_ALWAYS_INLINE explicit Simd(T scalar) : value(Native{} + scalar) {}
  FASTATTN_ALWAYS_INLINE explicit Simd(Native native) : value(native) {}
  static FASTATTN_ALWAYS_INLINE Simd load(const T* source) {
    Simd loaded;
    std::memcpy(&loaded.value, source, sizeof(Native));
    return loaded;
  }
  FASTATTN_ALWAYS_INLINE void store(T* target) const { std::memcpy(target, &value, sizeof(Native)); }
  FASTATTN_ALWAYS_INLINE T lane(int64_t i) const { return value[i]; }
};
template <typename T, int B>
FASTATTN_ALWAYS_INLINE Simd<T, B> operator+(Simd<T, B> a, Simd<T, B> b) { return Simd<T, B>(a.value + b.value); }
template <typename T, int B>
FASTATTN_ALWAYS_INLINE Simd<T, B> operator-(Simd<T, B> a, Simd<T, B> b) { return Simd<T, B>(a.value - b.value); }
template <typename T, int B>
FASTATTN_ALWAYS_INLINE Simd<T, B> operator*(Simd<T, B> a, Simd<T, B> b) { return Simd<T, B>(a.value * b.value); }
template <typename T, int B>
FASTATTN_ALWAYS_INLINE Simd<T, B> operator/(Simd<T, B> a, Simd<T, B> b) { return Simd<T, B>(a.value / b.value); }
template <typename T, int B>  // a * b + c (one FMA where the ISA has it)
FASTATTN_ALWAYS_INLINE Simd<T, B> fmadd(Simd<T, B> a, Simd<T, B> b, Simd<T, B> c) {
  return Simd<T, B>(a.value * b.value + c.value);
}
// min / max that return a NaN in a, as fastattn::PropagatingMin / Max do.
template <typename T, int B>
FASTATTN_ALWAYS_INLINE Simd<T, B> minimum(Simd<T, B> a, Simd<T, B> b) {
  return Simd<T, B>(b.value < a.value ? b.value : a.value);
}
template <typename T, int B>
FASTATTN_ALWAYS_INLINE Simd<T, B> maximum(Simd<T, B> a, Simd<T, B> b) {
  return Simd<T, B>(b.value > a.value ? b.value : a.value);
}
#else
template <typename T, int kBytes>  // kBytes: ignored, Vectorized has its own width
struct Simd {
  using Native = at::vec::Vectorized<T>;
  using Lane = T;
  Native value;
  static constexpr int64_t size() { return Native::size(); }
  Simd() = default;
  explicit Simd(T scalar) : value(scalar) {}
  explicit Simd(const Native& native) : value(native) {}
  static Simd load(const T* source) { return Simd(Native::loadu(source)); }
  void store(T* target) const { value.store(target); }
  T lane(int64_t i) const { return value[i]; }
};
template <typename T, int B>
Simd<T, B> operator+(const Simd<T, B>& a, const Simd<T, B>& b) { return Simd<T, B>(a.value + b.value); }
template <typename T, int B>
Simd<T, B> operator-(const Simd<T, B>& a, const Simd<T, B>& b) { return Simd<T, B>(a.value - b.value); }
template <typename T, int B>
Simd<T, B> operator*(const Simd<T, B>& a, const Simd<T, B>& b) { return Simd<T, B>(a.value * b.value); }
template <typename T, int B>
Simd<T, B> operator/(const Simd<T, B>& a, const Simd<T, B>& b) { return Simd<T, B>(a.value / b.value); }
template <typename T, int B>
Simd<T, B> fmadd(const Simd<T, B>& a, const Simd<T, B>& b, const Simd<T, B>& c) {
  return Simd<T, B>(at::vec::fmadd(a.value, b.value, c.value));
}
template <typename T, int B>  // clamp_max(a, b) = a > b ? b : a, a NaN in a kept
Simd<T, B> minimum(const Simd<T, B>& a, const Simd<T, B>& b) {
  return Simd<T, B>(at::vec::clamp_max(a.value, b.value));
}
template <typename T, int B>
Simd<T, B> maximum(const Simd<T, B>& a, const Simd<T, B>& b) {
  return Simd<T, B>(at::vec::clamp_min(a.value, b.value));
}
#endif

// The lanes an element type is computed in: double for double, float for float, float16
// and bfloat16 (the forward reads float16 / bfloat16 keys and values as they are stored).
template <typename E>
using LaneOf = std::conditional_t<std::is_same_v<E, double>, double, float>;

#if defined(__GNUC__) || defined(__clang__)
// The vectors of 16-bit elements that widen to kLanes 32-bit lanes (16, 32 or 64 bytes).
template <int kLanes>
struct WideningVectors;
template <>
struct WideningVectors<4> {
  typedef uint16_t Narrow __attribute__((vector_size(8)));
  typedef uint32_t Wide __attribute__((vector_size(16)));
  typedef float Floats __attribute__((vector_size(16)));
};
template <>
struct WideningVectors<8> {
  typedef uint16_t Narrow __attribute__((vector_size(16)));
  typedef uint32_t Wide __attribute__((vector_size(32)));
  typedef float Floats __attribute__((vector_size(32)));
};
template <>
struct WideningVectors<16> {
  typedef uint16_t Narrow __attribute__((vector_size(32)));
  typedef uint32_t Wide __attribute__((vector_size(64)));
  typedef float Floats __attribute__((vector_size(64)));
};

template <typename To, typename From>
FASTATTN_ALWAYS_INLINE To same_bits(const From& from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  std::memcpy(&to, &from, sizeof(to));
  return to;
}

// The bits of kLanes float16 or bfloat16 elements widened to float32 bits, exactly.
// float16: the branch-free method of c10's fp16_ieee_to_fp32_value (subnormals, infinities
// and NaN included) on integer and float vectors, so no F16C instruction or library call.
template <typename E, int kLanes>
FASTATTN_ALWAYS_INLINE typename WideningVectors<kLanes>::Wide widened_bits(const E* source) {
  using Vectors = WideningVectors<kLanes>;
  using Wide = typename Vectors::Wide;
  using Floats = typename Vectors::Floats;
  typename Vectors::Narrow narrow;
  std::memcpy(&narrow, source, sizeof(narrow));
  const Wide word = __builtin_convertvector(narrow, Wide) << 16;
  if constexpr (std::is_same_v<E, c10::BFloat16>) {  // a bfloat16 is a float's upper 16 bits
    return word;
  } else {
    const Wide sign = word & 0x80000000u;
    const Wide twice = word + word;  // exponent and mantissa, the sign shifted out
    const Floats normal = same_bits<Floats>((twice >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const Floats subnormal = same_bits<Floats>((twice >> 17) | (126u << 23)) - 0.5f;
    return sign | (twice < (1u << 27) ? same_bits<Wide>(subnormal) : same_bits<Wide>(normal));
  }
}
#endif

// V::size() elements of type E from `source` as V's lanes: a plain load when E is the
// lane type; float16 / bfloat16 widened to float (exactly) on the way.
template <typename V, typename E>
FASTATTN_ALWAYS_INLINE V load_lanes(const E* source) {
  using T = typename V::Lane;
  if constexpr (std::is_same_v<E, T>) {
    return V::load(source);
  } else {
    static_assert(std::is_same_v<T, float> && (std::is_same_v<E, c10::BFloat16> || std::is_same_v<E, c10::Half>));
#if defined(__GNUC__) || defined(__clang__)
    return same_bits<V>(widened_bits<E, V::size()>(source));
#else
    T lanes[V::size()];
    for (int64_t i = 0; i < V::size(); ++i) lanes[i] = static_cast<T>(source[i]);
    return V::load(lanes);
#endif
  }
}

struct SimdMinimum {
  template <typename V>
  FASTATTN_ALWAYS_INLINE V operator()(const V& a, const V& b) const { return minimum(a, b); }
};
struct SimdMaximum {
  template <typename V>
  FASTATTN_ALWAYS_INLINE V operator()(const V& a, const V& b) const { return maximum(a, b); }
};

template <int B>
FASTATTN_ALWAYS_INLINE Simd<float, B> vector_tanh(const Simd<float, B>& x) {
  return fastattn::fast_tanh_with(x, SimdMinimum{}, SimdMaximum{});
}

template <typename T, int B>
FASTATTN_ALWAYS_INLINE T sum_lanes(const Simd<T, B>& x) {
  T sum = T(0);
  for (int64_t i = 0; i < Simd<T, B>::size(); ++i) sum += x.lane(i);
  return sum;
}

// a . b in the lanes of A (a and b: T, or float16 / bfloat16 elements E widened to float).
template <int kBytes, typename A, typename E, typename T = LaneOf<A>>
FASTATTN_ALWAYS_INLINE T dot_product(const A* a, const E* b, int64_t size) {
  using V = Simd<T, kBytes>;
  constexpr int64_t kWidth = V::size();
  V sum0(T(0)), sum1(T(0));
  int64_t d = 0;
  for (; d + 2 * kWidth <= size; d += 2 * kWidth) {
    sum0 = fmadd(load_lanes<V>(a + d), load_lanes<V>(b + d), sum0);
    sum1 = fmadd(load_lanes<V>(a + d + kWidth), load_lanes<V>(b + d + kWidth), sum1);
  }
  if (d + kWidth <= size) {
    sum0 = fmadd(load_lanes<V>(a + d), load_lanes<V>(b + d), sum0);
    d += kWidth;
  }
  T sum = sum_lanes(sum0 + sum1);
  for (; d < size; ++d) sum += static_cast<T>(a[d]) * static_cast<T>(b[d]);
  return sum;
}

// a . (factor * b - c)
template <int kBytes, typename T>
FASTATTN_ALWAYS_INLINE T dot_with_difference(const T* a, const T* b, T factor, const T* c, int64_t size) {
  using V = Simd<T, kBytes>;
  constexpr int64_t kWidth = V::size();
  const V scale(factor);
  V sum(T(0));
  int64_t d = 0;
  for (; d + kWidth <= size; d += kWidth) sum = fmadd(V::load(a + d), fmadd(scale, V::load(b + d), V(T(0)) - V::load(c + d)), sum);
  T total = sum_lanes(sum);
  for (; d < size; ++d) total += a[d] * (factor * b[d] - c[d]);
  return total;
}

// y += alpha * x (x: T, or float16 / bfloat16 widened to float); kAdd false: y = alpha * x,
// what the sum gives on a y of zeros, without reading y.
template <int kBytes, bool kAdd = true, typename T, typename E>
FASTATTN_ALWAYS_INLINE void axpy(T* y, T alpha, const E* x, int64_t size) {
  using V = Simd<T, kBytes>;
  constexpr int64_t kWidth = V::size();
  const V factor(alpha);
  int64_t d = 0;
  for (; d + kWidth <= size; d += kWidth) {
    if constexpr (kAdd) {
      fmadd(factor, load_lanes<V>(x + d), V::load(y + d)).store(y + d);
    } else {
      (factor * load_lanes<V>(x + d)).store(y + d);
    }
  }
  for (; d < size; ++d) y[d] = (kAdd ? y[d] : T(0)) + alpha * static_cast<T>(x[d]);
}

// y += partial, then partial = 0: a block's own sum added to the running one (the blocked
// sums that keep long float32 rows within the reference's error).
template <int kBytes, typename T>
FASTATTN_ALWAYS_INLINE void add_and_clear(T* y, T* partial, int64_t size) {
  axpy<kBytes>(y, T(1), partial, size);
  std::fill_n(partial, size, T(0));
}

// out[i] = a . b_i for four vectors b_i (T, or float16 / bfloat16) sharing the loads of a.
template <int kBytes, typename T, typename E>
FASTATTN_ALWAYS_INLINE void dot_products4(const T* a, const E* b0, const E* b1, const E* b2, const E* b3,
                                          int64_t size, T* out) {
  using V = Simd<T, kBytes>;
  constexpr int64_t kWidth = V::size();
  V sum0(T(0)), sum1(T(0)), sum2(T(0)), sum3(T(0));
  int64_t d = 0;
  for (; d + kWidth <= size; d += kWidth) {
    const V x = V::load(a + d);
    sum0 = fmadd(x, load_lanes<V>(b0 + d), sum0);
    sum1 = fmadd(x, load_lanes<V>(b1 + d), sum1);
    sum2 = fmadd(x, load_lanes<V>(b2 + d), sum2);
    sum3 = fmadd(x, load_lanes<V>(b3 + d), sum3);
  }
  T result0 = sum_lanes(sum0), result1 = sum_lanes(sum1), result2 = sum_lanes(sum2), result3 = sum_lanes(sum3);
  for (; d < size; ++d) {
    result0 += a[d] * static_cast<T>(b0[d]);
    result1 += a[d] * static_cast<T>(b1[d]);
    result2 += a[d] * static_cast<T>(b2[d]);
    result3 += a[d] * static_cast<T>(b3[d]);
  }
  out[0] = result0;
  out[1] = result1;
  out[2] = result2;
  out[3] = result3;
}

// y += w[0] x0 + w[1] x1 + w[2] x2 + w[3] x3 (one pass over y for four rows; x_i: T, or
// float16 / bfloat16).
template <int kBytes, typename T, typename E>
FASTATTN_ALWAYS_INLINE void axpy4(T* y, const T* w, const E* x0, const E* x1, const E* x2, const E* x3,
                                  int64_t size) {
  using V = Simd<T, kBytes>;
  constexpr int64_t kWidth = V::size();
  const V w0(w[0]), w1(w[1]), w2(w[2]), w3(w[3]);
  int64_t d = 0;
  for (; d + kWidth <= size; d += kWidth) {
    V sum = fmadd(w0, load_lanes<V>(x0 + d), V::load(y + d));
    sum = fmadd(w1, load_lanes<V>(x1 + d), sum);
    sum = fmadd(w2, load_lanes<V>(x2 + d), sum);
    fmadd(w3, load_lanes<V>(x3 + d), sum).store(y + d);
  }
  for (; d < size; ++d) {
    y[d] += w[0] * static_cast<T>(x0[d]) + w[1] * static_cast<T>(x1[d]) + w[2] * static_cast<T>(x2[d]) +
            w[3] * static_cast<T>(x3[d]);
  }
}

// y *= alpha
template <int kBytes, typename T>
FASTATTN_ALWAYS_INLINE void scale_in_place(T* y, T alpha, int64_t size) {
  using V = Simd<T, kBytes>;
  constexpr int64_t kWidth = V::size();
  const V factor(alpha);
  int64_t d = 0;
  for (; d + kWidth <= size; d += kWidth) (V::load(y + d) * factor).store(y + d);
  for (; d < size; ++d) y[d] *= alpha;
}

// e = v . tanh(q_b + k): fast_tanh on float vectors, libm tanh for double; the key
// may be float16 / bfloat16 (widened to float).
template <int kBytes, typename T, typename E>
FASTATTN_ALWAYS_INLINE T additive_score_row(const T* query_plus_bias, const E* key, const T* v, int64_t size) {
  if constexpr (std::is_same_v<T, float>) {
    using V = Simd<float, kBytes>;
    constexpr int64_t kWidth = V::size();
    V sum0(0.0f), sum1(0.0f);
    int64_t d = 0;
    for (; d + 2 * kWidth <= size; d += 2 * kWidth) {
      const V u0 = vector_tanh(V::load(query_plus_bias + d) + load_lanes<V>(key + d));
      const V u1 = vector_tanh(V::load(query_plus_bias + d + kWidth) + load_lanes<V>(key + d + kWidth));
      sum0 = fmadd(V::load(v + d), u0, sum0);
      sum1 = fmadd(V::load(v + d + kWidth), u1, sum1);
    }
    if (d + kWidth <= size) {
      sum0 = fmadd(V::load(v + d), vector_tanh(V::load(query_plus_bias + d) + load_lanes<V>(key + d)), sum0);
      d += kWidth;
    }
    float sum = sum_lanes(sum0 + sum1);
    for (; d < size; ++d) sum += v[d] * fastattn::tanh_of(query_plus_bias[d] + static_cast<float>(key[d]));
    return sum;
  } else {
    return fastattn::additive_score(query_plus_bias, key, v, size);
  }
}

// u = tanh(q_b + k) into `activation` (the additive score's, kept for its backward);
// returns e = v . u, summed as additive_score_row sums it.
template <int kBytes, typename T>
FASTATTN_ALWAYS_INLINE T additive_activations(const T* query_plus_bias, const T* key, const T* v, T* activation,
                                              int64_t size) {
  int64_t d = 0;
  T sum = T(0);
  if constexpr (std::is_same_v<T, float>) {
    using V = Simd<float, kBytes>;
    constexpr int64_t kWidth = V::size();
    V sum0(0.0f), sum1(0.0f);
    for (; d + 2 * kWidth <= size; d += 2 * kWidth) {
      const V u0 = vector_tanh(V::load(query_plus_bias + d) + V::load(key + d));
      const V u1 = vector_tanh(V::load(query_plus_bias + d + kWidth) + V::load(key + d + kWidth));
      u0.store(activation + d);
      u1.store(activation + d + kWidth);
      sum0 = fmadd(V::load(v + d), u0, sum0);
      sum1 = fmadd(V::load(v + d + kWidth), u1, sum1);
    }
    if (d + kWidth <= size) {
      const V u0 = vector_tanh(V::load(query_plus_bias + d) + V::load(key + d));
      u0.store(activation + d);
      sum0 = fmadd(V::load(v + d), u0, sum0);
      d += kWidth;
    }
    sum = sum_lanes(sum0 + sum1);
  }
  for (; d < size; ++d) {
    activation[d] = fastattn::tanh_of(query_plus_bias[d] + key[d]);
    sum += v[d] * activation[d];
  }
  return sum;
}

// Backward of e = v . tanh(q_b + k) for one (t, j), given de and u = tanh(q_b + k):
// grad_v += de u, du = de v (1 - u^2), grad_query += du, grad_key += du.
template <int kBytes, typename T>
FASTATTN_ALWAYS_INLINE void additive_score_backward(const T* activation, const T* v, T grad_score, T* grad_query,
                                                    T* grad_key, T* grad_v, int64_t size) {
  int64_t d = 0;
  if constexpr (std::is_same_v<T, float>) {
    using V = Simd<float, kBytes>;
    constexpr int64_t kWidth = V::size();
    const V de(grad_score);
    const V one(1.0f);
    for (; d + kWidth <= size; d += kWidth) {
      const V u = V::load(activation + d);
      fmadd(de, u, V::load(grad_v + d)).store(grad_v + d);
      const V du = de * V::load(v + d) * (one - u * u);
      (V::load(grad_query + d) + du).store(grad_query + d);
      (V::load(grad_key + d) + du).store(grad_key + d);
    }
  }
  for (; d < size; ++d) {
    const T u = activation[d];
    grad_v[d] += grad_score * u;
    const T du = grad_score * v[d] * fastattn::tanh_derivative(u);
    grad_query[d] += du;
    grad_key[d] += du;
  }
}

// out = gradient of u = x / max(|x|, floor) given du (out may alias du).
template <int kBytes, typename T>
FASTATTN_ALWAYS_INLINE void unit_vector_backward(const T* grad_unit, const T* input, T norm, T floor, T* out,
                                                 int64_t size) {
  const auto gradient = fastattn::unit_vector_gradient(norm, dot_product<kBytes>(grad_unit, input, size), floor);
  for (int64_t d = 0; d < size; ++d) {
    out[d] = gradient.of(grad_unit[d], input[d]);
  }
}

template <int kBytes>
FASTATTN_ALWAYS_INLINE void fast_tanh_span(const float* input, float* output, int64_t size) {
  using V = Simd<float, kBytes>;
  constexpr int64_t kWidth = V::size();
  int64_t i = 0;
  for (; i + kWidth <= size; i += kWidth) vector_tanh(V::load(input + i)).store(output + i);
  for (; i < size; ++i) output[i] = fastattn::tanh_of(input[i]);
}

// ---------------------------------------------------------------- the problem

// Raw pointers into the compute-dtype tensors (T = float or double); the keys and
// values in E: T, or float16 / bfloat16 as given (T = float), read by the forward kernel.
template <typename T, typename E = T>
struct AttentionProblem {
  int64_t batch = 0, query_length = 0, source_length = 0, score_dim = 0, value_dim = 0;
  const T* query = nullptr;  // (N, T, D) contiguous
  const E* keys = nullptr;   // rows contiguous; batch stride may be 0
  int64_t keys_batch_stride = 0;
  const E* values = nullptr;
  int64_t values_batch_stride = 0;
  const T* v = nullptr;
  const T* bias = nullptr;
  const T* key_norms = nullptr;  // cosine: |k_j|, (N or 1, S)
  int64_t key_norms_batch_stride = 0;
  const T* query_norms = nullptr;  // cosine from q.k on the raw query (bfloat16 GEMMs): |q|, (N, T)
  T scale = T(1);
  const int64_t* lengths = nullptr;
  const bool* key_padding_mask = nullptr;
  bool causal = false;
  int64_t window = -1;  // < 0: global attention
  const T* center = nullptr;
  bool gaussian = false;
  // A key whose score lies more than this below its row's max (negligible_gap, or -inf:
  // none) gets weight 0 in the kernel's own sums: set where no output or gradient shows
  // those weights themselves (see negligible_gap).
  T negligible_gap = fastattn::negative_infinity<T>();
  T norm_floor = fastattn::cosine_norm_floor<T>();  // the cosine's, for the input dtype (cosine_norm_floor_of)

  const E* key(int64_t n, int64_t j) const { return keys + n * keys_batch_stride + j * score_dim; }
  const E* value(int64_t n, int64_t j) const { return values + n * values_batch_stride + j * value_dim; }
  T key_norm(int64_t n, int64_t j) const { return key_norms[n * key_norms_batch_stride + j]; }
  bool is_padding(int64_t n, int64_t j) const {
    return key_padding_mask != nullptr && key_padding_mask[n * source_length + j];
  }
  T window_center(int64_t n, int64_t t) const {
    return center != nullptr ? center[n * query_length + t] : static_cast<T>(t);
  }
  KeyRange keys_of(int64_t n, int64_t t) const {
    const int64_t length = lengths != nullptr ? lengths[n] : source_length;
    return fastattn::key_range<T>(t, source_length, length, causal, window,
                                  window >= 0 ? window_center(n, t) : T(0));
  }
};

// The query as the score uses it: q (dot), q / max(|q|, floor) (cosine), q + bias
// (additive).  Returns q itself or `buffer`; *query_norm gets |q| for the cosine.
template <typename T, ScoreKind kScore, int kBytes, typename E>
FASTATTN_ALWAYS_INLINE const T* prepare_query(const AttentionProblem<T, E>& problem, const T* query, T* buffer,
                                              T* query_norm) {
  const int64_t size = problem.score_dim;
  if constexpr (kScore == ScoreKind::kCosine) {
    *query_norm = std::sqrt(dot_product<kBytes>(query, query, size));
    const T clamped = fastattn::clamped_norm(*query_norm, problem.norm_floor);
    for (int64_t d = 0; d < size; ++d) buffer[d] = query[d] / clamped;
    return buffer;
  } else if constexpr (kScore == ScoreKind::kAdditive) {
    if (problem.bias == nullptr) return query;
    for (int64_t d = 0; d < size; ++d) buffer[d] = query[d] + problem.bias[d];
    return buffer;
  } else {
    return query;
  }
}

// The score from q'.k for the dot and cosine scores (q' = the prepared query).
template <typename T, ScoreKind kScore, typename E>
FASTATTN_ALWAYS_INLINE T score_from_dot(const AttentionProblem<T, E>& problem, T dot, int64_t n, int64_t j) {
  if constexpr (kScore == ScoreKind::kCosine) {
    return problem.scale * (dot / fastattn::clamped_norm(problem.key_norm(n, j), problem.norm_floor));
  } else {
    return dot * problem.scale;
  }
}

// The divisor that makes q.k of query row `row` the q'.k score_from_dot takes: max(|q|,
// floor) for the cosine from the raw query (problem.query_norms), else 1.
template <typename T, ScoreKind kScore, typename E>
FASTATTN_ALWAYS_INLINE T query_divisor(const AttentionProblem<T, E>& problem, int64_t row) {
  if constexpr (kScore == ScoreKind::kCosine) {
    if (problem.query_norms != nullptr) return fastattn::clamped_norm(problem.query_norms[row], problem.norm_floor);
  }
  return T(1);
}

// scores[j] = e_{t,j} for the `count` keys j = keys[0..count) of batch n; dot and
// cosine score four keys at a time.
template <typename T, ScoreKind kScore, int kBytes, typename E>
FASTATTN_ALWAYS_INLINE void score_keys(const AttentionProblem<T, E>& problem, const T* prepared_query, int64_t n,
                                       const int64_t* keys, int64_t count, T* scores) {
  const int64_t dim = problem.score_dim;
  int64_t c = 0;
  if constexpr (kScore == ScoreKind::kAdditive) {
    for (; c < count; ++c) {
      scores[keys[c]] = additive_score_row<kBytes>(prepared_query, problem.key(n, keys[c]), problem.v, dim);
    }
  } else {
    for (; c + 4 <= count; c += 4) {
      T dots[4];
      dot_products4<kBytes>(prepared_query, problem.key(n, keys[c]), problem.key(n, keys[c + 1]),
                            problem.key(n, keys[c + 2]), problem.key(n, keys[c + 3]), dim, dots);
      for (int i = 0; i < 4; ++i) scores[keys[c + i]] = score_from_dot<T, kScore>(problem, dots[i], n, keys[c + i]);
    }
    for (; c < count; ++c) {
      const T dot = dot_product<kBytes>(prepared_query, problem.key(n, keys[c]), dim);
      scores[keys[c]] = score_from_dot<T, kScore>(problem, dot, n, keys[c]);
    }
  }
}

// out[c] = a . values[n, keys[c]] for c < count.
template <int kBytes, typename T>
FASTATTN_ALWAYS_INLINE void dot_with_values(const AttentionProblem<T>& problem, const T* a, int64_t n,
                                            const int64_t* keys, int64_t count, T* out) {
  const int64_t dim = problem.value_dim;
  int64_t c = 0;
  for (; c + 4 <= count; c += 4) {
    dot_products4<kBytes>(a, problem.value(n, keys[c]), problem.value(n, keys[c + 1]), problem.value(n, keys[c + 2]),
                          problem.value(n, keys[c + 3]), dim, out + c);
  }
  for (; c < count; ++c) out[c] = dot_product<kBytes>(a, problem.value(n, keys[c]), dim);
}

// y += sum_c weights[c] values[n, keys[c]], four value rows per pass over y.
template <int kBytes, typename T, typename E>
FASTATTN_ALWAYS_INLINE void accumulate_values(const AttentionProblem<T, E>& problem, T* y, int64_t n,
                                              const int64_t* keys, const T* weights, int64_t count) {
  const int64_t dim = problem.value_dim;
  int64_t c = 0;
  for (; c + 4 <= count; c += 4) {
    axpy4<kBytes>(y, weights + c, problem.value(n, keys[c]), problem.value(n, keys[c + 1]),
                  problem.value(n, keys[c + 2]), problem.value(n, keys[c + 3]), dim);
  }
  for (; c < count; ++c) axpy<kBytes>(y, weights[c], problem.value(n, keys[c]), dim);
}

// ---------------------------------------------------------------- forward

// The accumulation type of a row's softmax sums (its normaliser, the backward's row term,
// the Gaussian's center gradient): double, whatever T.  Summed key by key in float32
// they erred ~sqrt(S) ulps (S = 70000: weights 6e-5 relative where the reference's
// float32 softmax errs 4e-7).  The exponentials stay in T; only the adds are double.
using RowSum = double;

template <typename T>
struct ForwardOutputs {
  T* context = nullptr;    // (N, T, Dv)
  T* weights = nullptr;    // (N, T, S) or null
  T* logsumexp = nullptr;  // (N, T)
};

template <typename T, ScoreKind kScore, int kBytes, typename E>
FASTATTN_ALWAYS_INLINE void forward_rows(const AttentionProblem<T, E>& problem, const ForwardOutputs<T>& out,
                                         int64_t row_begin, int64_t row_end) {
  const int64_t query_length = problem.query_length, source_length = problem.source_length;
  const int64_t value_dim = problem.value_dim;
  const T minus_infinity = fastattn::negative_infinity<T>();
  std::vector<T> scores(source_length), context(value_dim), block_context(value_dim), prepared(problem.score_dim);
  int64_t block_keys[kKeyBlock];
  T block_weights[kKeyBlock];
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t n = row / query_length, t = row % query_length;
    const KeyRange range = problem.keys_of(n, t);
    T query_norm = T(0);
    const T* query = prepare_query<T, kScore, kBytes>(problem, problem.query + row * problem.score_dim,
                                                      prepared.data(), &query_norm);
    const T center = problem.window_center(n, t);
    // The row's sum in double (RowSum): summed key by key in float32, the sum of a long row
    // (S = 10^4 .. 10^5, a decoder step over a long source) erred ~sqrt(S) ulps, 10-200x
    // the reference's float32 softmax, and every weight carried it.
    fastattn::OnlineSoftmax<T, RowSum> softmax;
    std::fill(context.begin(), context.end(), T(0));
    for (int64_t block_begin = range.begin; block_begin < range.end; block_begin += kKeyBlock) {
      const int64_t block_end = std::min(range.end, block_begin + kKeyBlock);
      int64_t count = 0;  // the block's keys that are not padding
      for (int64_t j = block_begin; j < block_end; ++j) {
        if (problem.is_padding(n, j)) {
          scores[j] = minus_infinity;
        } else {
          block_keys[count++] = j;
        }
      }
      if (count == 0) continue;
      score_keys<T, kScore, kBytes>(problem, query, n, block_keys, count, scores.data());
      T block_max = minus_infinity;  // NaN once a score is NaN: the row's outputs are then NaN
      for (int64_t c = 0; c < count; ++c) block_max = fastattn::nan_or_max(block_max, scores[block_keys[c]]);
      if (block_max == minus_infinity) continue;
      const T previous_max = softmax.max_score;
      const T factor = softmax.raise_max(block_max);
      if (previous_max - block_max < problem.negligible_gap) {  // the sums so far are negligible
        std::fill(context.begin(), context.end(), T(0));
      } else if (factor != T(1)) {
        scale_in_place<kBytes>(context.data(), factor, value_dim);
      }
      for (int64_t c = 0; c < count; ++c) {
        const int64_t j = block_keys[c];
        if (scores[j] - softmax.max_score < problem.negligible_gap) {  // see negligible_gap
          block_weights[c] = T(0);
          continue;
        }
        T weight = softmax.add(scores[j]);
        if (problem.gaussian) weight *= fastattn::gaussian_factor(j, center, problem.window);
        block_weights[c] = weight;
      }
      // The block's values summed on their own, then added to the row's: a row's context is
      // a sum of S / kKeyBlock block sums, not one running sum over its S keys.
      accumulate_values<kBytes>(problem, block_context.data(), n, block_keys, block_weights, count);
      add_and_clear<kBytes>(context.data(), block_context.data(), value_dim);
    }
    T* context_row = out.context + row * value_dim;
    T* weights_row = out.weights != nullptr ? out.weights + row * source_length : nullptr;
    if (softmax.empty()) {  // fully masked row
      std::fill(context_row, context_row + value_dim, T(0));
      out.logsumexp[row] = minus_infinity;
      if (weights_row != nullptr) std::fill(weights_row, weights_row + source_length, T(0));
      continue;
    }
    const T inverse_sum = static_cast<T>(RowSum(1) / softmax.sum);
    for (int64_t d = 0; d < value_dim; ++d) context_row[d] = context[d] * inverse_sum;
    out.logsumexp[row] = softmax.logsumexp();
    if (weights_row != nullptr) {
      std::fill(weights_row, weights_row + range.begin, T(0));
      for (int64_t j = range.begin; j < range.end; ++j) {
        if (scores[j] == minus_infinity) {
          weights_row[j] = T(0);
          continue;
        }
        T weight = fastattn::exp_of(scores[j] - softmax.max_score) * inverse_sum;
        if (problem.gaussian) weight *= fastattn::gaussian_factor(j, center, problem.window);
        weights_row[j] = weight;
      }
      std::fill(weights_row + range.end, weights_row + source_length, T(0));
    }
  }
}

// ---------------------------------------------------------------- backward

// The probabilities of a row from its own scores, p_j = exp(e_j - m) / sum_k exp(e_k - m)
// (m: the row's maximum), as the forward's weights are.  exp(e_j - logsumexp) would carry
// logsumexp's rounding (half an ulp of the largest score: 1e-5 relative at scores ~200 in
// float32) into every p_j (the values' gradient of peaked rows erred 10x the
// reference's).  scores[keys[c]]: e on entry, p on exit, for the row's `count` keys.
// keys[c]: the row's c-th visible key.  ListedKeys for rows with holes (padding), or
// ContiguousKeys for a row whose visible keys are one range, over which the loops below
// vectorise.
struct ListedKeys {
  const int64_t* keys;
  int64_t operator[](int64_t c) const { return keys[c]; }
};
struct ContiguousKeys {
  int64_t first;
  int64_t operator[](int64_t c) const { return first + c; }
};

// The first c < count with x[keys[c]] == value, count when there is none: a min-reduction
// over all `count` keys in place of a loop that stops at the first (which does not
// vectorise, and mispredicts its exit once a row).
template <typename T, typename Keys>
FASTATTN_ALWAYS_INLINE int64_t first_holding(const T* x, Keys keys, int64_t count, T value) {
  int64_t first = count;
#pragma omp simd reduction(min : first)
  for (int64_t c = 0; c < count; ++c) {
    const int64_t candidate = x[keys[c]] == value ? c : count;
    first = candidate < first ? candidate : first;
  }
  return first;
}

// e^x for x <= 0 in the softmax rows: float through exp_of_nonpositive_with (a polynomial,
// branch free, so that the rows vectorise, where libm's expf kept them scalar; within 1.2
// ulps of e^x, measured on every fourth float in [-87, 0]), double through exp.
inline float row_exp(float x) { return fastattn::exp_of_nonpositive_with(x, fastattn::SelectBits{}); }
inline double row_exp(double x) { return fastattn::exp_of(x); }

// Negligible weights: below negligible_weight, 2^-63 in float and 2^-511 in double (the
// square root of the smallest normal), of the row's largest weight (the row kernels' online
// softmax: a score more than negligible_gap below the max) or of 1 (normalised weights).
// All S of them together move a row's sums by less than S 2^-63 of their size, under
// float32's rounding for any S below 10^11.  But under e^-87 such a weight is subnormal in
// float32, and this CPU takes a microcode assist of about a hundred cycles for each
// instruction that reads or makes a subnormal: a float32 decode step at N = 64, S = 64,
// D = 1024 with 16% of its weights subnormal (scores of spread ~32: q and k of unit
// entries) ran 5x slower than with flat scores (one thread), each of those weights' value
// rows an assist per vector.  So where no output or gradient shows the weights themselves
// (the context's sums; the backward without a weights' gradient, whose dE_j = p_j (dC . v_j
// - r) is then as small as p_j) they are taken as 0, and the row kernels never take their
// exponential.  The returned weights, and the backward with a weights' gradient (-log w_j's
// is -1 / w_j: p_j dw_j is not small), keep them.
template <typename T>
constexpr T negligible_weight() {
  return std::is_same_v<T, double> ? T(0x1p-511) : T(0x1p-63);
}
template <typename T>
constexpr T negligible_gap() {  // ln(negligible_weight)
  return std::is_same_v<T, double> ? T(-511 * 0.693147180559945309) : T(-63 * 0.693147180559945309);
}

// to[i] = from[i], or 0 where it is negligible (normalised weights).
template <typename T>
void drop_negligible(const T* from, T* to, int64_t size) {
  const T smallest = negligible_weight<T>();
#pragma omp simd
  for (int64_t i = 0; i < size; ++i) to[i] = from[i] < smallest ? T(0) : from[i];
}

// e^gap, or 0 for a gap below cut (negligible_gap, or -inf: never), without the
// exponential of such a gap (whose result could be subnormal).  float through bit-mask
// selects, which keep GCC's vectoriser on the rows' loops (a ?: stopped it: the float32
// matrix-multiply path's softmax rows ran 1.4x slower).
FASTATTN_ALWAYS_INLINE float row_exp_above(float gap, float cut) {
  const bool below = gap < cut;
  return fastattn::select_bits(below, 0.0f, row_exp(fastattn::select_bits(below, 0.0f, gap)));
}
FASTATTN_ALWAYS_INLINE double row_exp_above(double gap, double cut) { return gap < cut ? 0.0 : row_exp(gap); }

// out[keys[c]] = e^(in[keys[c]] - row_max) for a row's `count` keys, whose lowest score is
// row_lowest, negligible ones 0 (row_exp_above) when the row has any; -> their sum, in
// double (RowSum).  A row without one skips row_exp_above's selects (a flat row's pass
// ran ~30% longer with them).  Vectorises.
template <typename T, typename Keys>
FASTATTN_ALWAYS_INLINE RowSum row_exponentials(const T* in, T* out, Keys keys, int64_t count, T row_max,
                                               T row_lowest, T negligible_gap) {
  const auto pass = [&](auto exp_of) {
    RowSum sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < count; ++c) {
      const T exponential = exp_of(in[keys[c]] - row_max);
      out[keys[c]] = exponential;
      sum += exponential;
    }
    return sum;
  };
  if (row_lowest - row_max < negligible_gap) return pass([=](T gap) { return row_exp_above(gap, negligible_gap); });
  return pass([](T gap) { return row_exp(gap); });
}

template <typename T, typename Keys>
FASTATTN_ALWAYS_INLINE void probabilities_of_row(T* scores, Keys keys, int64_t count, T negligible_gap) {
  T row_max = fastattn::negative_infinity<T>(), row_lowest = std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : row_max) reduction(min : row_lowest)
  for (int64_t c = 0; c < count; ++c) {
    row_max = scores[keys[c]] > row_max ? scores[keys[c]] : row_max;
    row_lowest = scores[keys[c]] < row_lowest ? scores[keys[c]] : row_lowest;
  }
  const RowSum sum = row_exponentials(scores, scores, keys, count, row_max, row_lowest, negligible_gap);
  const T inverse_sum = static_cast<T>(RowSum(1) / sum);
#pragma omp simd
  for (int64_t c = 0; c < count; ++c) scores[keys[c]] *= inverse_sum;
}

template <typename T>
struct BackwardInputs {
  const T* grad_context = nullptr;  // (N, T, Dv)
  const T* grad_weights = nullptr;  // (N, T, S) or null
  const T* logsumexp = nullptr;     // (N, T)
};

// The softmax backward of one row, dE_j = p_j (dw_j - r) with r = sum_i p_i dw_i (dw_j: the
// gradient reaching weight j), is taken as p_j ((dw_j - dw_m) - sum_i p_i (dw_i - dw_m)),
// m the row's most probable key: the same since the p_i add up to 1, but exact at m and
// free of the cancellation of two near-equal sums elsewhere.  In a peaked row the plain
// form left rounding noise of eps |dw_m| in every dE_j, which the scale (and |q|) then
// multiplied into the query and key gradients: float32 at |q| ~ 3000 erred 1.8e-3 where
// the true gradient is 6e-46, float64 sdpa at scale 1e20 gave 1e5 for 0.
template <typename T>
struct ShiftedRowTerm {
  T shift;     // dw_m
  T row_term;  // sum_i p_i (dw_i - dw_m)
  T score_gradient(T probability, T grad_alpha) const {
    return fastattn::softmax_score_gradient(probability, grad_alpha - shift, row_term);
  }
};

// probabilities and grad_alpha indexed by key; keys: the row's `count` visible keys.
template <typename T, typename Keys>
ShiftedRowTerm<T> shifted_row_term(const T* probabilities, const T* grad_alpha, Keys keys, int64_t count) {
  if (count == 0) return {T(0), T(0)};
  T top_probability = probabilities[keys[0]];  // the first of the largest (a NaN first: that one)
#pragma omp simd reduction(max : top_probability)
  for (int64_t c = 1; c < count; ++c) {
    top_probability = probabilities[keys[c]] > top_probability ? probabilities[keys[c]] : top_probability;
  }
  const int64_t top_index = first_holding(probabilities, keys, count, top_probability);
  const int64_t top = keys[top_index < count ? top_index : 0];
  const T shift = grad_alpha[top];
  RowSum row_term = 0;  // in double (RowSum)
#pragma omp simd reduction(+ : row_term)
  for (int64_t c = 0; c < count; ++c) row_term += probabilities[keys[c]] * (grad_alpha[keys[c]] - shift);
  return {shift, static_cast<T>(row_term)};
}

template <typename T>
struct BackwardOutputs {  // uninitialised: the kernel zeroes each batch's slices before it accumulates
  T* grad_query = nullptr;   // (N, T, D)
  T* grad_keys = nullptr;    // (N, S, D); one (S, D) block for every n when grad_keys_batch_stride is 0
  int64_t grad_keys_batch_stride = 0;
  T* grad_values = nullptr;  // (N, S, Dv); unused when the values are the keys
  bool values_are_keys = false;  // the values' terms go to grad_keys (not told by a null grad_values:
                                 // an empty (N, S, 0) tensor's data pointer is null too)
  T* grad_center = nullptr;  // (N, T) or null
};

// Batches [n_begin, n_end).  grad_v_sum / grad_bias_sum: this chunk's (Da,)
// accumulators (additive score; grad_bias_sum null without bias).
template <typename T, ScoreKind kScore, int kBytes>
FASTATTN_ALWAYS_INLINE void backward_batches(const AttentionProblem<T>& problem, const BackwardInputs<T>& in,
                                             const BackwardOutputs<T>& out, int64_t n_begin, int64_t n_end,
                                             T* grad_v_sum, T* grad_bias_sum) {
  const int64_t query_length = problem.query_length, source_length = problem.source_length;
  const int64_t score_dim = problem.score_dim, value_dim = problem.value_dim;
  std::vector<T> alpha(source_length), grad_alpha(source_length), factor(source_length), scores(source_length);
  std::vector<T> value_dots(source_length);
  std::vector<int64_t> visible_keys(source_length);
  std::vector<T> prepared(score_dim), grad_unit_query(kScore == ScoreKind::kCosine ? score_dim : 0);
  std::vector<T> activation(kScore == ScoreKind::kAdditive ? score_dim : 0);
  std::vector<T> block_grad_query(score_dim), block_grad_v(kScore == ScoreKind::kAdditive ? score_dim : 0);
  // With more than kRowBlock query rows, the keys' and values' gradients of each block of
  // kRowBlock rows are summed here on their own, then added to the batch element's (only
  // over the keys the block's rows saw): one running sum over T rows erred ~sqrt(T) ulps
  // (causal self-attention, T = S = 4000, D = 32: 7x the reference's float32 error).
  const bool block_rows = query_length > kRowBlock;
  std::vector<T> rows_grad_keys(block_rows ? source_length * score_dim : 0);
  std::vector<T> rows_grad_values(block_rows ? source_length * value_dim : 0);
  // The additive score's u = tanh(q_b + k) of every key of a row, from its scores' pass for
  // its gradients' (key j's at (j - range.begin) * Da), when they fit.
  const bool cache_activations =
      kScore == ScoreKind::kAdditive && source_length * score_dim <= kActivationCacheElements;
  std::vector<T> activations(cache_activations ? source_length * score_dim : 0);
  // Each batch's gradient slices are zeroed here, by the thread that accumulates into
  // them and while they are in its cache, rather than by a pass over whole tensors
  // before the kernel (which costs a write and a read of every gradient from memory).
  // One query row a batch element (a decode step) with keys of its own, dot or cosine score:
  // each key's gradient rows get one term, written as such (zeros where nothing flows),
  // where zeroing them first and adding to them took a third of the backward's time (B=32,
  // S=64, D=256, two cores).
  const bool write_once = query_length == 1 && out.grad_keys_batch_stride != 0 && kScore != ScoreKind::kAdditive;
  // Values that are the keys: each key's value term goes to its gradient row with its key
  // term (after the key term's way through the unit key for the cosine score: one batch
  // element's value terms wait in unit_key_values until then).
  const bool values_are_keys = out.values_are_keys;
  const bool cosine_values_are_keys = values_are_keys && kScore == ScoreKind::kCosine;
  std::vector<T> unit_key_values(cosine_values_are_keys ? source_length * value_dim : 0);
  if (out.grad_keys_batch_stride == 0) std::fill_n(out.grad_keys, source_length * score_dim, T(0));
  for (int64_t n = n_begin; n < n_end; ++n) {
    T* grad_keys = out.grad_keys + n * out.grad_keys_batch_stride;
    T* grad_values = !values_are_keys         ? out.grad_values + n * source_length * value_dim
                     : cosine_values_are_keys ? unit_key_values.data()
                                              : grad_keys;
    // Under write_once: the rows of keys [begin, end) zeroed.
    const auto zero_key_rows = [&](int64_t begin, int64_t end) {
      std::fill(grad_keys + begin * score_dim, grad_keys + end * score_dim, T(0));
      std::fill(grad_values + begin * value_dim, grad_values + end * value_dim, T(0));
    };
    if (!write_once) {
      if (out.grad_keys_batch_stride != 0) std::fill_n(grad_keys, source_length * score_dim, T(0));
      std::fill_n(grad_values, source_length * value_dim, T(0));
    }
    std::fill_n(out.grad_query + n * query_length * score_dim, query_length * score_dim, T(0));
    if (out.grad_center != nullptr) std::fill_n(out.grad_center + n * query_length, query_length, T(0));
    T* const key_gradients = block_rows ? rows_grad_keys.data() : grad_keys;
    T* const value_gradients = block_rows ? rows_grad_values.data() : grad_values;
    const bool key_term_first = write_once && value_gradients != key_gradients;  // see add_term
    int64_t touched_begin = source_length, touched_end = 0, rows_in_block = 0;
    const auto flush_rows = [&] {  // the block's sums into the batch element's, the buffers zeroed
      if (touched_end > touched_begin) {
        const int64_t keys = touched_end - touched_begin;
        add_and_clear<kBytes>(grad_keys + touched_begin * score_dim, rows_grad_keys.data() + touched_begin * score_dim,
                              keys * score_dim);
        add_and_clear<kBytes>(grad_values + touched_begin * value_dim,
                              rows_grad_values.data() + touched_begin * value_dim, keys * value_dim);
      }
      touched_begin = source_length;
      touched_end = 0;
      rows_in_block = 0;
    };
    for (int64_t t = 0; t < query_length; ++t) {
      const int64_t row = n * query_length + t;
      const T logsumexp = in.logsumexp[row];
      const bool fully_masked = logsumexp == fastattn::negative_infinity<T>();
      if (fully_masked && write_once) zero_key_rows(0, source_length);
      if (fully_masked) continue;  // zero gradients
      const KeyRange range = problem.keys_of(n, t);
      if (write_once) {
        zero_key_rows(0, range.begin);
        zero_key_rows(range.end, source_length);
      }
      if (block_rows) {
        if (rows_in_block == kRowBlock) flush_rows();
        ++rows_in_block;
        touched_begin = std::min(touched_begin, range.begin);
        touched_end = std::max(touched_end, range.end);
      }
      const T* query_row = problem.query + row * score_dim;
      T query_norm = T(0);
      const T* query = prepare_query<T, kScore, kBytes>(problem, query_row, prepared.data(), &query_norm);
      const T center = problem.window_center(n, t);
      const T* grad_context = in.grad_context + row * value_dim;
      const T* grad_weights = in.grad_weights != nullptr ? in.grad_weights + row * source_length : nullptr;

      // alpha_j recomputed; dw_j = grad_context . v_j + grad_weights_j; dalpha_j = dw_j g_j.
      int64_t count = 0;
      for (int64_t j = range.begin; j < range.end; ++j) {
        if (problem.is_padding(n, j)) {
          alpha[j] = T(0);
        } else {
          visible_keys[count++] = j;
        }
      }
      if (cache_activations) {  // additive_activations sums e as score_keys does
        for (int64_t c = 0; c < count; ++c) {
          const int64_t j = visible_keys[c];
          scores[j] = additive_activations<kBytes>(query, problem.key(n, j), problem.v,
                                                   activations.data() + (j - range.begin) * score_dim, score_dim);
        }
      } else {
        score_keys<T, kScore, kBytes>(problem, query, n, visible_keys.data(), count, scores.data());
      }
      probabilities_of_row(scores.data(), ListedKeys{visible_keys.data()}, count, problem.negligible_gap);
      dot_with_values<kBytes>(problem, grad_context, n, visible_keys.data(), count, value_dots.data());
      RowSum grad_center = 0;
      for (int64_t c = 0; c < count; ++c) {
        const int64_t j = visible_keys[c];
        const T probability = scores[j];
        const T gaussian = problem.gaussian ? fastattn::gaussian_factor(j, center, problem.window) : T(1);
        T grad_weight = value_dots[c];
        if (grad_weights != nullptr) grad_weight += grad_weights[j];
        alpha[j] = probability;
        factor[j] = gaussian;
        grad_alpha[j] = grad_weight * gaussian;
        if (out.grad_center != nullptr) {
          grad_center += grad_weight * probability * gaussian * fastattn::gaussian_log_slope(j, center, problem.window);
        }
      }
      const ShiftedRowTerm<T> row_term = shifted_row_term(alpha.data(), grad_alpha.data(), ListedKeys{visible_keys.data()}, count);
      if (out.grad_center != nullptr) out.grad_center[row] = static_cast<T>(grad_center);

      T* grad_query_row = out.grad_query + row * score_dim;
      T* grad_query = grad_query_row;
      if constexpr (kScore == ScoreKind::kCosine) {
        std::fill(grad_unit_query.begin(), grad_unit_query.end(), T(0));
        grad_query = grad_unit_query.data();
      }
      // The query's gradient (and the additive v's) summed over each block of kKeyBlock keys
      // on its own, then added: a sum of S / kKeyBlock block sums, not one running sum of S
      // terms (which erred ~sqrt(S) ulps on long rows, as the forward's sums did).
      T* const row_grad_query = grad_query;
      T* const row_grad_v = grad_v_sum;
      grad_query = block_grad_query.data();
      if constexpr (kScore == ScoreKind::kAdditive) grad_v_sum = block_grad_v.data();
      int64_t in_block = 0;
      const auto flush_block = [&] {  // the block buffers are zero between rows (cleared here)
        add_and_clear<kBytes>(row_grad_query, block_grad_query.data(), score_dim);
        if constexpr (kScore == ScoreKind::kAdditive) add_and_clear<kBytes>(row_grad_v, block_grad_v.data(), score_dim);
        in_block = 0;
      };
      for (int64_t j = range.begin; j < range.end; ++j) {
        const T probability = alpha[j];
        if (probability == T(0)) {  // padding, or exp underflow: nothing flows
          if (write_once) zero_key_rows(j, j + 1);
          continue;
        }
        if (in_block == kKeyBlock) flush_block();
        ++in_block;
        const T grad_score = row_term.score_gradient(probability, grad_alpha[j]);
        // The key's and the value's gradient rows: += this row's term, or = it (the first
        // term of a write_once row: the value's, then the key's unless that is the same row).
        const auto add_term = [&](T* y, T scale, const auto* x, int64_t size, bool first) {
          if (first) {
            axpy<kBytes, false>(y, scale, x, size);
          } else {
            axpy<kBytes>(y, scale, x, size);
          }
        };
        add_term(value_gradients + j * value_dim, probability * factor[j], grad_context, value_dim, write_once);
        const T* key = problem.key(n, j);
        T* grad_key = key_gradients + j * score_dim;
        if constexpr (kScore == ScoreKind::kDot) {
          const T scaled = problem.scale * grad_score;
          axpy<kBytes>(grad_query, scaled, key, score_dim);
          add_term(grad_key, scaled, query_row, score_dim, key_term_first);
        } else if constexpr (kScore == ScoreKind::kCosine) {
          const T scaled = problem.scale * grad_score;  // grad_key holds d(unit key) until the end of n
          axpy<kBytes>(grad_query, scaled / fastattn::clamped_norm(problem.key_norm(n, j), problem.norm_floor), key,
                       score_dim);
          add_term(grad_key, scaled, query, score_dim, key_term_first);
        } else {
          const T* u = activations.data() + (j - range.begin) * score_dim;
          if (!cache_activations) {
            additive_activations<kBytes>(query, key, problem.v, activation.data(), score_dim);
            u = activation.data();
          }
          additive_score_backward<kBytes>(u, problem.v, grad_score, grad_query, grad_key, grad_v_sum, score_dim);
        }
      }
      flush_block();
      grad_query = row_grad_query;
      grad_v_sum = row_grad_v;
      if constexpr (kScore == ScoreKind::kCosine) {
        unit_vector_backward<kBytes>(grad_unit_query.data(), query_row, query_norm, problem.norm_floor, grad_query_row,
                                     score_dim);
      }
      if constexpr (kScore == ScoreKind::kAdditive) {
        if (grad_bias_sum != nullptr) axpy<kBytes>(grad_bias_sum, T(1), grad_query_row, score_dim);
      }
    }
    if (block_rows) flush_rows();
    // Through the unit keys; keys shared by the batch take it once, after the sum over n.
    if constexpr (kScore == ScoreKind::kCosine) {
      for (int64_t j = 0; out.grad_keys_batch_stride != 0 && j < source_length; ++j) {
        T* grad_key = grad_keys + j * score_dim;
        unit_vector_backward<kBytes>(grad_key, problem.key(n, j), problem.key_norm(n, j), problem.norm_floor, grad_key,
                                     score_dim);
        if (cosine_values_are_keys) axpy<kBytes>(grad_key, T(1), grad_values + j * value_dim, value_dim);
      }
    }
  }
}

// ---------------------------------------------------------------- ISA clones and dispatch (isa.h)

template <typename T, typename E>
using ForwardKernel = void (*)(const AttentionProblem<T, E>&, const ForwardOutputs<T>&, int64_t, int64_t);
template <typename T>
using BackwardKernel = void (*)(const AttentionProblem<T>&, const BackwardInputs<T>&, const BackwardOutputs<T>&,
                                int64_t, int64_t, T*, T*);

// The row kernels and fast_tanh of one ISA: forward_rows_<isa>, backward_batches_<isa> and
// fast_tanh_<isa>, compiled with `attribute` (FASTATTN_KERNEL for the baseline, else a target)
// on Simd vectors of kBytes.
#define FASTATTN_ROW_KERNELS(isa, attribute, kBytes)                                                                 \
  template <typename T, typename E, ScoreKind kScore>                                                                 \
  attribute void forward_rows_##isa(const AttentionProblem<T, E>& problem, const ForwardOutputs<T>& out,             \
                                    int64_t begin, int64_t end) {                                                    \
    forward_rows<T, kScore, kBytes>(problem, out, begin, end);                                                       \
  }                                                                                                                  \
  template <typename T, ScoreKind kScore>                                                                            \
  attribute void backward_batches_##isa(const AttentionProblem<T>& problem, const BackwardInputs<T>& in,             \
                                        const BackwardOutputs<T>& out, int64_t begin, int64_t end, T* grad_v,        \
                                        T* grad_bias) {                                                              \
    backward_batches<T, kScore, kBytes>(problem, in, out, begin, end, grad_v, grad_bias);                            \
  }                                                                                                                  \
  attribute void fast_tanh_##isa(const float* input, float* output, int64_t size) {                                  \
    fast_tanh_span<kBytes>(input, output, size);                                                                     \
  }

FASTATTN_ROW_KERNELS(baseline, FASTATTN_KERNEL, 16)
#ifdef FASTATTN_AVX2_CLONES
FASTATTN_ROW_KERNELS(avx2, FASTATTN_TARGET_AVX2, 32)
FASTATTN_ROW_KERNELS(avx512, FASTATTN_TARGET_AVX512, 64)
#endif

// The row kernels of a score for this CPU.  The additive score's run in 64-byte vectors
// where the CPU has AVX-512: with its tanh per (query, key, feature) the multi-query forward
// at B=32, T=S=64, D=256 ran 1.35-1.40x faster and its forward and backward 1.18-1.19x on a
// 2-core Intel Xeon (benchmarks/results/2026-12-07-cpu-2core-intel-avx512/).  The dot-product and cosine scores' stay on AVX2, their
// rows a dot product a key: a decode step at B=32, S=64, D=256 ran 0-6% slower on AVX-512.
template <ScoreKind kScore>
constexpr bool kAvx512RowKernels = kScore == ScoreKind::kAdditive;

template <typename T, typename E, ScoreKind kScore>
ForwardKernel<T, E> forward_kernel_for() {
#ifdef FASTATTN_AVX2_CLONES
  ForwardKernel<T, E> avx512 = &forward_rows_avx2<T, E, kScore>;
  if constexpr (kAvx512RowKernels<kScore>) avx512 = &forward_rows_avx512<T, E, kScore>;
  return kernel_for_this_cpu<ForwardKernel<T, E>>(&forward_rows_baseline<T, E, kScore>, &forward_rows_avx2<T, E, kScore>,
                                                  avx512);
#else
  return &forward_rows_baseline<T, E, kScore>;
#endif
}

template <typename T, ScoreKind kScore>
BackwardKernel<T> backward_kernel_for() {
#ifdef FASTATTN_AVX2_CLONES
  BackwardKernel<T> avx512 = &backward_batches_avx2<T, kScore>;
  if constexpr (kAvx512RowKernels<kScore>) avx512 = &backward_batches_avx512<T, kScore>;
  return kernel_for_this_cpu<BackwardKernel<T>>(&backward_batches_baseline<T, kScore>,
                                                &backward_batches_avx2<T, kScore>, avx512);
#else
  return &backward_batches_baseline<T, kScore>;
#endif
}

template <typename T, typename E>
ForwardKernel<T, E> forward_kernel(ScoreKind score) {
  switch (score) {
    case ScoreKind::kDot:
      return forward_kernel_for<T, E, ScoreKind::kDot>();
    case ScoreKind::kCosine:
      return forward_kernel_for<T, E, ScoreKind::kCosine>();
    default:
      return forward_kernel_for<T, E, ScoreKind::kAdditive>();
  }
}

template <typename T>
BackwardKernel<T> backward_kernel(ScoreKind score) {
  switch (score) {
    case ScoreKind::kDot:
      return backward_kernel_for<T, ScoreKind::kDot>();
    case ScoreKind::kCosine:
      return backward_kernel_for<T, ScoreKind::kCosine>();
    default:
      return backward_kernel_for<T, ScoreKind::kAdditive>();
  }
}

// ---------------------------------------------------------------- argument checks

ScoreKind parse_score(const char* op, std::string_view score) {
  if (score == "dot") return ScoreKind::kDot;
  if (score == "cosine") return ScoreKind::kCosine;
  if (score == "additive") return ScoreKind::kAdditive;
  TORCH_CHECK_VALUE(false, op, ": score must be \"dot\", \"cosine\" or \"additive\", got \"", std::string(score), "\"");
}

bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

// `t` in the compute dtype, a batch-stride-0 tensor staying unexpanded.
at::Tensor in_dtype(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) return t;
  if (t.dim() == 3 && t.size(0) > 1 && t.stride(0) == 0) {
    return t.select(0, 0).to(dtype).unsqueeze(0).expand(t.sizes());
  }
  return t.to(dtype);
}

// (N, S, D) with contiguous (S, D) rows, keeping a batch stride of 0.
at::Tensor with_contiguous_rows(const at::Tensor& t) {
  const bool rows_contiguous = (t.size(2) <= 1 || t.stride(2) == 1) && (t.size(1) <= 1 || t.stride(1) == t.size(2));
  if (rows_contiguous) return t;
  if (t.size(0) > 1 && t.stride(0) == 0) return t.select(0, 0).contiguous().unsqueeze(0).expand(t.sizes());
  return t.contiguous();
}

void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
}

void check_float_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& query) {
  check_cpu(op, name, t);
  TORCH_CHECK_TYPE(t.scalar_type() == query.scalar_type(), op, ": ", name, " must have the dtype of query (",
                   query.scalar_type(), "), got ", t.scalar_type());
}

// The cosine's norm floor for inputs of input_dtype, the reference's cosine_norm_floor:
// float16's smallest normal number for float16 (in which 1 / 1e-8, a zero row's gradient
// factor, overflows to inf), else 1e-8.
double cosine_norm_floor_of(at::ScalarType input_dtype) {
  return input_dtype == at::kHalf ? 0x1p-14 : fastattn::cosine_norm_floor<double>();
}

// Which op the inputs are for: the two may take different paths (use_blas_path), since
// each recomputes what it needs from the inputs (the backward reads the forward's
// logsumexp only to find the fully masked rows).
enum class Pass { kForward, kBackward };

// The checked inputs of attention_forward / attention_backward, in the compute
// dtype (float for float32/float16/bfloat16, double for float64), except float16 /
// bfloat16 keys and values: kept as given for the forward's row kernel, converted by
// keys_and_values_in_compute_dtype for the GEMM paths and the backward; where the bfloat16
// GEMMs run (bfloat16_gemms below), the query too is kept, and the keys and values are not
// converted.
struct PreparedInputs {
  ScoreKind score = ScoreKind::kDot;
  at::ScalarType input_dtype = at::kFloat, compute_dtype = at::kFloat;
  int64_t batch = 0, query_length = 0, source_length = 0, score_dim = 0, value_dim = 0;
  at::Tensor query, keys, values, v, bias, lengths, key_padding_mask, center, key_norms;
  at::Tensor query_norms;  // the cosine with bfloat16 GEMMs: |q|, (N, T), divided out after q.k
  bool shared_keys = false;  // keys given as (1, S, D) for N > 1: expanded here, grad_keys (1, S, D)
  Pass pass = Pass::kForward;
  double scale = 1.0;
  bool causal = false;
  int64_t window = -1;
  bool gaussian = false;
  // The matrix-multiply path with bfloat16 inputs and the dot or cosine score, on a CPU
  // with AVX512-BF16: the GEMMs whose outputs the softmax needs in float32 (the scores q k^T,
  // and the backward's dW = dC v^T) are bfloat16_matmul_nt's, on the caller's tensors (the
  // cosine's norms divided out of q.k after it: query_norms, key_norms); the others are
  // bfloat16 at::bmm (oneDNN's bfloat16 dot products) on W and dE rounded to bfloat16, as
  // FlashAttention rounds them before these GEMMs, and on the cosine's unit vectors rounded
  // to bfloat16, their outputs rounded once, as they are returned.  Both run at about twice
  // the rate of the float32 GEMMs on widened copies they replace.  Set by prepare_inputs.
  bool bfloat16_gemms = false;
};

bool use_blas_path(const PreparedInputs& in);

// |x| of each row x of `rows` (N, R, D; rows contiguous within a batch element) as (N, R)
// in `dtype` (the compute dtype), or (1, R) for rows shared by the batch (batch stride 0):
// once per distinct row.
at::Tensor row_norms(const at::Tensor& rows, at::ScalarType dtype) {
  const int64_t batches = rows.size(0) > 1 && rows.stride(0) == 0 ? 1 : rows.size(0);
  const int64_t per_batch = rows.size(1), dim = rows.size(2), batch_stride = rows.stride(0);
  at::Tensor norms = at::empty({batches, per_batch}, rows.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "fastattn_row_norms", [&] {
    const scalar_t* data = rows.const_data_ptr<scalar_t>();
    LaneOf<scalar_t>* out = norms.mutable_data_ptr<LaneOf<scalar_t>>();
    at::parallel_for(0, batches * per_batch, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* x = data + (i / per_batch) * batch_stride + (i % per_batch) * dim;
        out[i] = std::sqrt(dot_product<16>(x, x, dim));
      }
    });
  });
  return norms;
}

// Whether the cosine may take q.k from the bfloat16 GEMM (vdpbf16ps flushes a float32
// sum below 2^-126 to 0 and can overflow where q and k are large): every norm within
// [2^-50, 2^50], so that the flushed part of q.k is below 2^-26 D of |q| |k| and no sum
// overflows.  Otherwise the float32 GEMMs run on the unit vectors, as for float16.
bool norms_suit_bfloat16_products(const at::Tensor& norms) {
  const auto [smallest, largest] = at::aminmax(norms);
  return smallest.item<double>() >= std::ldexp(1.0, -50) && largest.item<double>() <= std::ldexp(1.0, 50);
}

PreparedInputs prepare_inputs(const char* op, Pass pass, const at::Tensor& query, const at::Tensor& keys,
                              const at::Tensor& values, const std::optional<at::Tensor>& v,
                              const std::optional<at::Tensor>& bias, std::string_view score, double scale,
                              const std::optional<at::Tensor>& lengths,
                              const std::optional<at::Tensor>& key_padding_mask, bool causal,
                              std::optional<int64_t> window, const std::optional<at::Tensor>& center,
                              bool gaussian) {
  PreparedInputs in;
  in.pass = pass;
  in.score = parse_score(op, score);
  check_cpu(op, "query", query);
  TORCH_CHECK_TYPE(is_supported_float(query.scalar_type()), op,
                   ": query must be float32, float64, float16 or bfloat16, got ", query.scalar_type());
  check_float_like(op, "keys", keys, query);
  check_float_like(op, "values", values, query);
  TORCH_CHECK_VALUE(query.dim() == 3, op, ": query must be (N, T, D), got shape ", query.sizes());
  TORCH_CHECK_VALUE(keys.dim() == 3 && (keys.size(0) == query.size(0) || keys.size(0) == 1), op, ": keys must be (N=",
                    query.size(0), ", S, D) or (1, S, D) (shared by the batch), got shape ", keys.sizes());
  TORCH_CHECK_VALUE(values.dim() == 3 && values.size(0) == query.size(0) && values.size(1) == keys.size(1), op,
                    ": values must be (N=", query.size(0), ", S=", keys.size(1), ", Dv), got shape ", values.sizes());
  TORCH_CHECK_VALUE(keys.size(2) == query.size(2), op, ": keys must have the feature size D=", query.size(2),
                    " of query, got shape ", keys.sizes());
  in.input_dtype = query.scalar_type();
  in.compute_dtype = in.input_dtype == at::kDouble ? at::kDouble : at::kFloat;
  in.batch = query.size(0);
  in.query_length = query.size(1);
  in.source_length = keys.size(1);
  in.score_dim = query.size(2);
  in.value_dim = values.size(2);
  in.scale = scale;
  in.causal = causal;

  if (in.score == ScoreKind::kAdditive) {
    TORCH_CHECK_VALUE(scale == 1.0, op, ": scale must be 1 with score \"additive\" (v . tanh(q + k + bias) has none), got ",
                      scale);
    TORCH_CHECK_VALUE(v.has_value() && v->defined(), op, ": score \"additive\" needs v of shape (Da=", in.score_dim,
                      ",)");
    check_float_like(op, "v", *v, query);
    TORCH_CHECK_VALUE(v->dim() == 1 && v->size(0) == in.score_dim, op, ": v must be (Da=", in.score_dim,
                      ",), got shape ", v->sizes());
    in.v = in_dtype(*v, in.compute_dtype).contiguous();
    if (bias.has_value() && bias->defined()) {
      check_float_like(op, "bias", *bias, query);
      TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == in.score_dim, op, ": bias must be (Da=", in.score_dim,
                        ",), got shape ", bias->sizes());
      in.bias = in_dtype(*bias, in.compute_dtype).contiguous();
    }
  } else {
    TORCH_CHECK_VALUE(!(v.has_value() && v->defined()) && !(bias.has_value() && bias->defined()), op,
                      ": v and bias are parameters of the additive score only, got them with score \"",
                      std::string(score), "\"");
  }
  if (lengths.has_value() && lengths->defined()) {
    check_cpu(op, "lengths", *lengths);
    TORCH_CHECK_TYPE(at::isIntegralType(lengths->scalar_type(), /*includeBool=*/false), op,
                     ": lengths must be an integer tensor, got ", lengths->scalar_type());
    TORCH_CHECK_VALUE(lengths->dim() == 1 && lengths->size(0) == in.batch, op, ": lengths must be (N=", in.batch,
                      ",), got shape ", lengths->sizes());
    in.lengths = lengths->to(at::kLong).contiguous();
  }
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    check_cpu(op, "key_padding_mask", *key_padding_mask);
    TORCH_CHECK_TYPE(key_padding_mask->scalar_type() == at::kBool, op, ": key_padding_mask must be bool, got ",
                     key_padding_mask->scalar_type());
    TORCH_CHECK_VALUE(key_padding_mask->dim() == 2 && key_padding_mask->size(0) == in.batch &&
                          key_padding_mask->size(1) == in.source_length,
                      op, ": key_padding_mask must be (N=", in.batch, ", S=", in.source_length, "), got shape ",
                      key_padding_mask->sizes());
    in.key_padding_mask = key_padding_mask->contiguous();
  }
  if (window.has_value()) {
    TORCH_CHECK_VALUE(*window >= 0, op, ": window must be >= 0, got ", *window);
    in.window = *window;
  }
  if (center.has_value() && center->defined()) {
    check_cpu(op, "center", *center);
    TORCH_CHECK_TYPE(fastattn::is_center_dtype(center->scalar_type(), query.scalar_type()), op,
                     ": center must have the dtype of query (", query.scalar_type(),
                     "), or float32 for a float16 or bfloat16 query, got ", center->scalar_type());
    TORCH_CHECK_VALUE(window.has_value(), op, ": center (local-p attention) needs window");
    TORCH_CHECK_VALUE(center->dim() == 2 && center->size(0) == in.batch && center->size(1) == in.query_length, op,
                      ": center must be (N=", in.batch, ", T=", in.query_length, "), got shape ", center->sizes());
    in.center = in_dtype(*center, in.compute_dtype).contiguous();
  }
  in.gaussian = gaussian;
  TORCH_CHECK_VALUE(!gaussian || in.window >= 1, op, ": gaussian needs window >= 1 (sigma = window / 2), got ",
                    window.has_value() ? std::to_string(*window) : std::string("None"));

  in.keys = with_contiguous_rows(keys);
  in.shared_keys = keys.size(0) != in.batch;
  if (in.shared_keys) in.keys = in.keys.expand({in.batch, in.source_length, in.score_dim});
  in.values = with_contiguous_rows(values);
  if (in.score == ScoreKind::kCosine) in.key_norms = row_norms(in.keys, in.compute_dtype);

  // Copied only now that every argument is checked (an expanded query can be large); the
  // bfloat16 GEMMs read it as it is.
  in.bfloat16_gemms = in.input_dtype == at::kBFloat16 &&
                      (in.score == ScoreKind::kDot || in.score == ScoreKind::kCosine) &&
                      bfloat16_matmul_nt_available() && use_blas_path(in);
  in.query = in.bfloat16_gemms ? query.contiguous() : in_dtype(query, in.compute_dtype).contiguous();
  if (in.bfloat16_gemms && in.score == ScoreKind::kCosine) {
    in.query_norms = row_norms(in.query, in.compute_dtype);
    if (!norms_suit_bfloat16_products(in.query_norms) || !norms_suit_bfloat16_products(in.key_norms)) {
      in.bfloat16_gemms = false;
      in.query_norms = at::Tensor();
      in.query = in_dtype(in.query, in.compute_dtype);
    }
  }
  return in;
}

void keys_and_values_in_compute_dtype(PreparedInputs& in) {
  in.keys = in_dtype(in.keys, in.compute_dtype);
  in.values = in_dtype(in.values, in.compute_dtype);
}

// The problem without its query, keys, values, v and bias: what the row passes of the
// matrix-multiply path read (sizes, scale, key norms, masks, window), whatever the dtype of
// the keys and values.
template <typename T, typename E = T>
AttentionProblem<T, E> masks_of(const PreparedInputs& in) {
  AttentionProblem<T, E> problem;
  problem.batch = in.batch;
  problem.query_length = in.query_length;
  problem.source_length = in.source_length;
  problem.score_dim = in.score_dim;
  problem.value_dim = in.value_dim;
  if (in.key_norms.defined()) {
    problem.key_norms = in.key_norms.const_data_ptr<T>();
    problem.key_norms_batch_stride = in.key_norms.size(0) == 1 ? 0 : in.source_length;
  }
  if (in.query_norms.defined()) problem.query_norms = in.query_norms.const_data_ptr<T>();
  problem.scale = static_cast<T>(in.scale);
  problem.norm_floor = static_cast<T>(cosine_norm_floor_of(in.input_dtype));
  if (in.lengths.defined()) problem.lengths = in.lengths.const_data_ptr<int64_t>();
  if (in.key_padding_mask.defined()) problem.key_padding_mask = in.key_padding_mask.const_data_ptr<bool>();
  problem.causal = in.causal;
  problem.window = in.window;
  if (in.center.defined()) problem.center = in.center.const_data_ptr<T>();
  problem.gaussian = in.gaussian;
  return problem;
}

template <typename T, typename E = T>
AttentionProblem<T, E> problem_of(const PreparedInputs& in) {
  AttentionProblem<T, E> problem = masks_of<T, E>(in);
  problem.query = in.query.const_data_ptr<T>();
  problem.keys = in.keys.const_data_ptr<E>();
  problem.keys_batch_stride = in.keys.stride(0);
  problem.values = in.values.const_data_ptr<E>();
  problem.values_batch_stride = in.values.stride(0);
  if (in.v.defined()) problem.v = in.v.const_data_ptr<T>();
  if (in.bias.defined()) problem.bias = in.bias.const_data_ptr<T>();
  return problem;
}

// ---------------------------------------------------------------- BLAS forward (dot, cosine)

// For the dot and cosine scores with enough work per row, the two contractions
// are BLAS GEMMs: raw = q' @ k^T (q' = q, or q / max(|q|, floor) for the cosine; q
// itself with the bfloat16 GEMMs, max(|q|, floor) divided out in the row pass), then one
// fused pass per row turns raw into the weights in place (scale, masks, softmax, Gaussian
// factor, logsumexp), then context = weights @ values.

// Worth it when the problem is large enough to pay for the GEMM path's fixed costs (the
// (N, T, S) scores, the softmax and the row passes), when enough query rows read each key,
// when there are at least 16 keys, and when the masks leave most (t, j) pairs visible: the
// GEMMs pay for every pair, the streaming kernel visits only each row's key range (causal
// with T ~ S halves its work, a narrow window more).  The rows reading a key are T, or N T
// for keys shared by the batch (the location score's W_a) in bfloat16 where the bfloat16
// GEMMs run.  Measured on two cores, dot score, the two paths alternating (N = 4..128,
// S = 16..4096, D = 4..512, Dv = 0..512; the streaming kernel's speed per (t, j) pair is
// about the same at every D, the GEMMs' grows with it):
//   bfloat16 with the bfloat16 GEMMs: N T S (D + Dv) >= 2^19 (below it 0.5-0.9x the
//     streaming kernel's speed, at and above 0.9-5.8x), 2 rows a key, 1 for the dot score's
//     backward.  A decode step's dot backward ran 1.1-4.2x faster on the GEMMs (the fastattn
//     bench's decode forward and backward at B=32, S=64, D=256: 733-888 -> 627-756 us), its
//     cosine backward 0.7-0.8x (888-1120 -> 1090-1450 us), its forward 1.4x faster at S = 64
//     but 0.75-0.83x at S = 1024, 4096 and D = 512 with the values the keys, which the
//     streaming kernel reads once for both (a decode step's W v on this path is
//     bfloat16_decode_context's: W in float32, v widened in registers);
//   float32 (brgemm tiles): N T S (D + Dv) >= 2^17 (0.86-0.98x below, 1.1-1.3x at 2^18),
//     4 rows.  Against the streaming kernel's time at T = 1: 0.87-2.1x; T = 2: 0.76-0.94x,
//     but 2-4.5x the float32 reference's error in the weights at S = 30000 (torch's GEMMs
//     of 2 or 3 rows sum more accurately; from 4 rows the errors were equal); T = 4:
//     0.46-0.74x; T >= 16: 0.3-0.5x at D = 4..96;
//   float16, and bfloat16 without those GEMMs (float32 GEMMs on widened copies: 1.7-8x
//     the time at T = 1, even at T = 4): as float32, with 16 rows;
//   float64 (at::bmm, no tiles): 16 rows, D >= 128 and Dv >= 32 (or 0, weights alone, as
//     hard attention asks for them): 0.6-1.35x the time either way below that.
// Under 16 keys the streaming kernel was the faster forward at every dtype (T = 16..64:
// the GEMMs took 1.1-1.5x its time).
bool use_blas_path(const PreparedInputs& in) {
  if (in.score == ScoreKind::kAdditive || in.batch == 0 || in.source_length < 16) return false;
  const bool bfloat16_gemms = in.input_dtype == at::kBFloat16 && bfloat16_matmul_nt_available();
  const int64_t rows_per_key = in.shared_keys && bfloat16_gemms ? in.batch * in.query_length : in.query_length;
  const double work = static_cast<double>(in.batch) * in.query_length * in.source_length *
                      static_cast<double>(in.score_dim + in.value_dim);
  if (in.compute_dtype == at::kDouble) {
    if (rows_per_key < 16 || in.score_dim < 128 || (in.value_dim > 0 && in.value_dim < 32)) return false;
  } else if (bfloat16_gemms) {
    const bool dot_backward = in.pass == Pass::kBackward && in.score == ScoreKind::kDot;
    if (rows_per_key < (dot_backward ? 1 : 2) || work < (1 << 19)) return false;
  } else if (rows_per_key < (in.input_dtype == at::kFloat ? 4 : 16) || work < (1 << 17)) {
    return false;
  }
  double visible = 1.0;
  if (in.causal) {
    visible = std::min(visible, (static_cast<double>(in.query_length) + 1.0) / (2.0 * in.source_length));
  }
  if (in.window >= 0) visible = std::min(visible, (2.0 * in.window + 1.0) / in.source_length);
  return visible >= 0.75;
}

// The weights of rows [row_begin, row_end) from their raw scores, one pass over each row:
// raw (the rows from first_row on, all of them or a block) holds q'.k on entry and e_{t,j}
// (scaled, the cosine divided) on exit; weights (the same rows) gets the masked softmax
// with the Gaussian factor, lse[row] the logsumexp.  The softmax is the per-row kernels':
// row_exp, the sum in double (RowSum), the negligible weights dropped where the problem
// says (negligible_gap).  A row without a visible key: zeros, lse -inf; a NaN
// or +inf score: NaN over the keys the row attends, 0 elsewhere (as per row and in the
// reference), lse NaN or +inf.  With no padding mask the loops vectorise.
template <typename T, ScoreKind kScore>
void blas_softmax_rows(const AttentionProblem<T>& problem, T* raw, T* weights, int64_t first_row, T* lse,
                       int64_t row_begin, int64_t row_end) {
  const int64_t query_length = problem.query_length, source_length = problem.source_length;
  const T minus_infinity = fastattn::negative_infinity<T>();
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t n = row / query_length, t = row % query_length;
    const KeyRange range = problem.keys_of(n, t);
    const int64_t begin = range.begin, end = std::max(range.begin, range.end);
    T* scores = raw + (row - first_row) * source_length;
    T* alpha = weights + (row - first_row) * source_length;
    std::fill(alpha, alpha + begin, T(0));
    std::fill(alpha + end, alpha + source_length, T(0));
    const T divisor = query_divisor<T, kScore>(problem, row);
    if (problem.key_padding_mask == nullptr) {
#pragma omp simd
      for (int64_t j = begin; j < end; ++j) scores[j] = score_from_dot<T, kScore>(problem, scores[j] / divisor, n, j);
    } else {
      for (int64_t j = begin; j < end; ++j) {
        scores[j] = problem.is_padding(n, j) ? minus_infinity
                                             : score_from_dot<T, kScore>(problem, scores[j] / divisor, n, j);
      }
    }
    T max_score = minus_infinity, lowest_score = std::numeric_limits<T>::infinity();
    int nan_count = 0;  // an int, not a bool ||-reduction: GCC vectorises no bool lanes
#pragma omp simd reduction(max : max_score) reduction(min : lowest_score) reduction(+ : nan_count)
    for (int64_t j = begin; j < end; ++j) {
      max_score = scores[j] > max_score ? scores[j] : max_score;
      lowest_score = scores[j] < lowest_score ? scores[j] : lowest_score;
      nan_count += scores[j] != scores[j];
    }
    if (nan_count == 0 && max_score == minus_infinity) {  // no visible key
      std::fill(alpha + begin, alpha + end, T(0));
      lse[row] = minus_infinity;
      continue;
    }
    if (nan_count != 0 || !std::isfinite(max_score)) {
      for (int64_t j = begin; j < end; ++j) {
        alpha[j] = problem.is_padding(n, j) ? T(0) : std::numeric_limits<T>::quiet_NaN();
      }
      lse[row] = nan_count != 0 ? std::numeric_limits<T>::quiet_NaN() : max_score;
      continue;
    }
    // 0 at a padded key's -inf
    const RowSum sum = row_exponentials(scores, alpha, ContiguousKeys{begin}, end - begin, max_score, lowest_score,
                                        problem.negligible_gap);
    const T inverse_sum = static_cast<T>(RowSum(1) / sum);
#pragma omp simd
    for (int64_t j = begin; j < end; ++j) alpha[j] *= inverse_sum;
    lse[row] = max_score + static_cast<T>(fastattn::log_of(sum));
    if (problem.gaussian) {
      const T center = problem.window_center(n, t);
      for (int64_t j = begin; j < end; ++j) alpha[j] *= fastattn::gaussian_factor(j, center, problem.window);
    }
  }
}

// x / max(|x|, floor) for each row x of `rows` (N, R, D), as prepare_query computes
// the cosine's unit query; rows contiguous within a batch element, whose stride may be
// 0 (keys shared by the batch: computed once, returned expanded).  bfloat16 rows: the
// unit vector computed in float32, rounded once.
at::Tensor unit_rows(const at::Tensor& rows, double floor) {
  const bool shared = rows.size(0) > 1 && rows.stride(0) == 0;
  const at::Tensor distinct = (shared ? rows.narrow(0, 0, 1) : rows).contiguous();
  at::Tensor unit = at::empty_like(distinct);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, rows.scalar_type(), "fastattn_unit_rows", [&] {
    using Lane = LaneOf<scalar_t>;
    const scalar_t* input = distinct.const_data_ptr<scalar_t>();
    scalar_t* output = unit.mutable_data_ptr<scalar_t>();
    const int64_t dim = rows.size(2);
    at::parallel_for(0, distinct.size(0) * distinct.size(1), 256, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* x = input + row * dim;
        const Lane clamped =
            fastattn::clamped_norm(static_cast<Lane>(std::sqrt(dot_product<16>(x, x, dim))), static_cast<Lane>(floor));
        for (int64_t d = 0; d < dim; ++d) output[row * dim + d] = static_cast<scalar_t>(static_cast<Lane>(x[d]) / clamped);
      }
    });
  });
  return shared ? unit.expand(rows.sizes()) : unit;
}

// grad (N, R, D, contiguous), the gradient of unit_rows(rows), becomes in place the
// gradient of rows (as unit_rows takes them).  bfloat16: each row widened to float32,
// its gradient rounded once.
void through_unit_rows(at::Tensor& grad, const at::Tensor& rows, double floor) {
  TORCH_CHECK(grad.scalar_type() == rows.scalar_type() && grad.is_contiguous(),
              "through_unit_rows: grad must be contiguous, in the rows' dtype");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, rows.scalar_type(), "fastattn_through_unit_rows", [&] {
    using Lane = LaneOf<scalar_t>;
    constexpr bool kWiden = !std::is_same_v<scalar_t, Lane>;
    const scalar_t* input = rows.const_data_ptr<scalar_t>();
    scalar_t* gradient = grad.mutable_data_ptr<scalar_t>();
    const int64_t per_batch = rows.size(1), dim = rows.size(2), batch_stride = rows.stride(0);
    at::parallel_for(0, grad.size(0) * per_batch, 256, [&](int64_t begin, int64_t end) {
      std::vector<Lane> widened(kWiden ? 2 * dim : 0);
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* x = input + (row / per_batch) * batch_stride + (row % per_batch) * dim;
        scalar_t* g = gradient + row * dim;
        if constexpr (kWiden) {
          Lane *g_lanes = widened.data(), *x_lanes = g_lanes + dim;
          for (int64_t d = 0; d < dim; ++d) {
            g_lanes[d] = static_cast<Lane>(g[d]);
            x_lanes[d] = static_cast<Lane>(x[d]);
          }
          unit_vector_backward<16>(g_lanes, x_lanes, std::sqrt(dot_product<16>(x_lanes, x_lanes, dim)),
                                   static_cast<Lane>(floor), g_lanes, dim);
          for (int64_t d = 0; d < dim; ++d) g[d] = static_cast<scalar_t>(g_lanes[d]);
        } else {
          unit_vector_backward<16>(g, x, static_cast<scalar_t>(std::sqrt(dot_product<16>(x, x, dim))),
                                   static_cast<scalar_t>(floor), g, dim);
        }
      }
    });
  });
}

// out (N, R, C) = a (N, R, K) @ b (N, K, C) as float32 tiles (csrc/cpu/tile_gemm.h): a batch
// element at a time, or, for b with batch stride 0 (location keys), one (N R, K) @ (K, C).
// out contiguous; other dtypes: at::bmm_out.
void batched_matmul_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  if (b.size(0) > 1 && b.stride(0) == 0) {
    at::Tensor flat = out.view({1, -1, out.size(2)});
    fastattn::batched_matmul_into(flat, a.reshape({1, a.size(0) * a.size(1), a.size(2)}), b.narrow(0, 0, 1));
    return;
  }
  fastattn::batched_matmul_into(out, a, b);
}

// One row over its `count` visible keys (keys), the others already zeroed: scores hold
// scale * q.k on entry.  grad_center: the row's entry, or null (it is set only with the
// Gaussian factor, the only one that depends on the center).
template <typename T, typename Keys>
FASTATTN_ALWAYS_INLINE void blas_backward_row(const AttentionProblem<T>& problem, T* scores, T* grad_alpha, T* w,
                                              T center, T* grad_center, Keys keys, int64_t count) {
  probabilities_of_row(scores, keys, count, problem.negligible_gap);
  if (problem.gaussian) {
    RowSum center_gradient = 0;
    for (int64_t c = 0; c < count; ++c) {
      const int64_t j = keys[c];
      const T probability = scores[j], gaussian = fastattn::gaussian_factor(j, center, problem.window);
      const T grad_weight = grad_alpha[j];
      w[j] = probability * gaussian;
      grad_alpha[j] = grad_weight * gaussian;
      center_gradient += grad_weight * probability * gaussian * fastattn::gaussian_log_slope(j, center, problem.window);
    }
    if (grad_center != nullptr) *grad_center = static_cast<T>(center_gradient);
  } else {
#pragma omp simd
    for (int64_t c = 0; c < count; ++c) w[keys[c]] = scores[keys[c]];
  }
  const ShiftedRowTerm<T> row_term = shifted_row_term<T>(scores, grad_alpha, keys, count);
#pragma omp simd
  for (int64_t c = 0; c < count; ++c) {
    const int64_t j = keys[c];
    scores[j] = problem.scale * row_term.score_gradient(scores[j], grad_alpha[j]);
  }
}

// One row of blas_backward_rows: scores, grad_alpha and w are its rows.
template <typename T>
FASTATTN_ALWAYS_INLINE void blas_backward_row_of(const AttentionProblem<T>& problem, T* scores, T* grad_alpha, T* w,
                                                 const T* lse, T* grad_center, std::vector<int64_t>& visible_keys,
                                                 int64_t row) {
  const int64_t query_length = problem.query_length, source_length = problem.source_length;
  if (lse[row] == fastattn::negative_infinity<T>()) {  // fully masked: zero gradients
    std::fill(scores, scores + source_length, T(0));
    std::fill(w, w + source_length, T(0));
    return;
  }
  const int64_t n = row / query_length, t = row % query_length;
  const KeyRange range = problem.keys_of(n, t);
  const T center = problem.window_center(n, t);
  T* center_gradient = grad_center != nullptr ? grad_center + row : nullptr;
  const auto zero_outside = [&](int64_t begin, int64_t end) {
    for (T* row_data : {scores, grad_alpha, w}) std::fill(row_data + begin, row_data + end, T(0));
  };
  // e from raw as the forward's blas_softmax_rows makes it: q'.k scaled, or the cosine
  // from q.k on the raw query (problem.query_norms)
  const bool cosine_of_raw_query = problem.query_norms != nullptr;
  const T divisor = query_divisor<T, ScoreKind::kCosine>(problem, row);
  if (problem.key_padding_mask == nullptr) {  // the visible keys: the range
    zero_outside(0, range.begin);
    zero_outside(range.end, source_length);
    if (cosine_of_raw_query) {
#pragma omp simd
      for (int64_t j = range.begin; j < range.end; ++j) {
        scores[j] = score_from_dot<T, ScoreKind::kCosine>(problem, scores[j] / divisor, n, j);
      }
    } else {
      const T scale = problem.scale;
#pragma omp simd
      for (int64_t j = range.begin; j < range.end; ++j) scores[j] *= scale;
    }
    blas_backward_row(problem, scores, grad_alpha, w, center, center_gradient, ContiguousKeys{range.begin},
                      range.end - range.begin);
    return;
  }
  int64_t count = 0;
  for (int64_t j = 0; j < source_length; ++j) {
    if (j < range.begin || j >= range.end || problem.is_padding(n, j)) {
      zero_outside(j, j + 1);
    } else {
      scores[j] = cosine_of_raw_query ? score_from_dot<T, ScoreKind::kCosine>(problem, scores[j] / divisor, n, j)
                                      : scores[j] * problem.scale;
      visible_keys[count++] = j;
    }
  }
  blas_backward_row(problem, scores, grad_alpha, w, center, center_gradient, ListedKeys{visible_keys.data()}, count);
}

// Backward of the dot score through GEMMs: scores recomputed as a GEMM, one pass per
// row turns them into dE (and W = alpha g), then grad_values = W^T dC, grad_query = dE K,
// grad_keys = dE^T Q (BackwardGemms).  The cosine score is the dot score of the unit
// vectors (unit_rows), its gradients taken through them (through_unit_rows).
// The buffers of blas_backward_rows, each holding the rows from first_row on (all of
// them, or a block of them): raw, q.k on entry, dE on exit; grad_weights, dW = dC . v_j
// (+ the weights' gradient) on entry, scratch after; weights, W on exit.  With
// rounded_grad_scores and rounded_weights (bfloat16: the bfloat16 GEMMs' operands) each
// row's dE and W are rounded into them while the row is in cache, W kept in a row of
// scratch (weights unused).  The row term: ShiftedRowTerm.
template <typename T>
struct BackwardRowBuffers {
  T* raw = nullptr;
  T* grad_weights = nullptr;
  int64_t first_row = 0;
  T* weights = nullptr;
  c10::BFloat16* rounded_grad_scores = nullptr;
  c10::BFloat16* rounded_weights = nullptr;
};

// out = row rounded to bfloat16 (to nearest even, as Tensor.to; the loop vectorises).
inline void round_row(const float* row, int64_t count, c10::BFloat16* out) {
  for (int64_t j = 0; j < count; ++j) out[j] = c10::BFloat16(row[j]);
}

template <typename T>
void blas_backward_rows(const AttentionProblem<T>& problem, BackwardRowBuffers<T> buffers, const T* lse,
                        T* grad_center, int64_t row_begin, int64_t row_end) {
  const int64_t source_length = problem.source_length;
  const bool rounded = buffers.rounded_weights != nullptr;
  std::vector<int64_t> visible_keys(source_length);
  std::vector<T> weights_row(rounded ? source_length : 0);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t offset = (row - buffers.first_row) * source_length;
    T* scores = buffers.raw + offset;
    T* w = rounded ? weights_row.data() : buffers.weights + offset;
    blas_backward_row_of(problem, scores, buffers.grad_weights + offset, w, lse, grad_center, visible_keys, row);
    if constexpr (std::is_same_v<T, float>) {
      if (rounded) {
        round_row(scores, source_length, buffers.rounded_grad_scores + offset);
        round_row(w, source_length, buffers.rounded_weights + offset);
      }
    }
  }
}

// kFunction(args...) as its AVX2+FMA clone where the CPU has it (IsaClones, csrc/cpu/isa.h):
// the row passes of the matrix-multiply path, whose loops vectorise.  Not the AVX-512 clone:
// with it the dot and cosine multi-query forward at B=32, T=S=64, D=256 ran about 10% slower
// on a 2-core Intel Xeon (fastest of 300 calls 1012-1087 us against 896-951, three runs).
template <auto kFunction, typename... Args>
void run_for_this_cpu(Args... args) {
  IsaClones<kFunction>::up_to_avx2()(args...);
}

// The matrix-multiply path makes its scores (the forward's q.k, the backward's q.k and
// dC v^T) a block of about kBlockScores at a time, into buffers allocated once a call:
// whole batch elements a block where T S is at most that, else rows of one element.  Each
// block's row passes (and the forward's W V) run right after its GEMMs, while it is in
// cache, where (N, T, S) tensors had gone through memory, fresh allocations every call
// whose pages were faulted in each time (64 MiB for two at N = 1, T = 2048, S = 4096 in
// float32).
constexpr int64_t kBlockScores = int64_t{1} << 20;

// (batch elements, rows) of the largest block.
std::pair<int64_t, int64_t> largest_score_block(const PreparedInputs& in) {
  const int64_t scores_per_element = in.query_length * in.source_length;
  const int64_t rows = scores_per_element <= kBlockScores ? in.query_length
                                                          : std::max<int64_t>(1, kBlockScores / in.source_length);
  const int64_t batch =
      rows == in.query_length ? std::clamp<int64_t>(kBlockScores / std::max<int64_t>(1, scores_per_element), 1,
                                                    std::max<int64_t>(1, in.batch))
                              : 1;
  return {batch, rows};
}

// A buffer of the largest block's scores, in dtype.
at::Tensor score_block_buffer(const PreparedInputs& in, at::ScalarType dtype) {
  const auto [batch, rows] = largest_score_block(in);
  return at::empty({batch, rows, in.source_length}, in.query.options().dtype(dtype));
}

// A block: batch elements [n, n + batch), rows [t, t + rows) of each (whole elements when
// batch > 1, so the block's rows lie one after another), the first of them row first_row
// of the N T.
struct ScoreBlock {
  int64_t n, batch, t, rows, first_row;
  int64_t row_end() const { return first_row + batch * rows; }
  at::Tensor rows_of(const at::Tensor& x) const { return x.narrow(0, n, batch).narrow(1, t, rows); }  // x (N, T, ...)
  at::Tensor batch_of(const at::Tensor& x) const { return x.narrow(0, n, batch); }  // x (N, ...)
  // The block's place at the start of a score_block_buffer.
  at::Tensor in_buffer(const at::Tensor& buffer) const { return buffer.narrow(0, 0, batch).narrow(1, 0, rows); }
};

// block(ScoreBlock) for each block, in order.
template <typename Block>
void for_each_score_block(const PreparedInputs& in, const Block& block) {
  const auto [block_batch, block_rows] = largest_score_block(in);
  for (int64_t n = 0; n < in.batch; n += block_batch) {
    for (int64_t t = 0; t < in.query_length; t += block_rows) {
      block(ScoreBlock{n, std::min(block_batch, in.batch - n), t, std::min(block_rows, in.query_length - t),
                       n * in.query_length + t});
    }
  }
}

// Rows [row_begin, row_end) of block (the rows from first_row on, source_length long)
// rounded to bfloat16 into rounded, laid out as block.
void round_rows(const float* block, int64_t first_row, int64_t source_length, c10::BFloat16* rounded,
                int64_t row_begin, int64_t row_end) {
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t offset = (row - first_row) * source_length;
    round_row(block + offset, source_length, rounded + offset);
  }
}

// The forward's weights from scores (R rows, from first_row on, in the compute dtype) into
// weights (the same shape) by blas_softmax_rows, and in the same pass with rounded (float32
// weights) each row rounded into it (the same shape); lse is that of all the rows.  The
// negligible weights (see negligible_weight) are dropped unless the weights are returned;
// then with without_negligible (the same shape) the weights without them go there too.
// The profiler sees it as fastattn::softmax_rows.
template <typename T>
void weights_of_scores(const PreparedInputs& in, const at::Tensor& scores, at::Tensor& weights, int64_t first_row,
                       T* lse, bool returned, T* without_negligible = nullptr, c10::BFloat16* rounded = nullptr) {
  RECORD_FUNCTION("fastattn::softmax_rows", std::vector<c10::IValue>({scores}));
  AttentionProblem<T> problem = masks_of<T>(in);
  if (!returned) problem.negligible_gap = negligible_gap<T>();
  const int64_t row_end = first_row + scores.size(0) * scores.size(1);
  const int64_t grain = std::max<int64_t>(1, 16384 / in.source_length);
  T* raw = scores.mutable_data_ptr<T>();
  T* alpha = weights.mutable_data_ptr<T>();
  const bool cosine = in.score == ScoreKind::kCosine;
  at::parallel_for(first_row, row_end, grain, [&](int64_t begin, int64_t end) {
    if (cosine) {
      run_for_this_cpu<&blas_softmax_rows<T, ScoreKind::kCosine>>(problem, raw, alpha, first_row, lse, begin, end);
    } else {
      run_for_this_cpu<&blas_softmax_rows<T, ScoreKind::kDot>>(problem, raw, alpha, first_row, lse, begin, end);
    }
    if constexpr (std::is_same_v<T, float>) {
      if (rounded != nullptr) run_for_this_cpu<&round_rows>(alpha, first_row, in.source_length, rounded, begin, end);
    }
    if (without_negligible != nullptr) {
      const int64_t offset = (begin - first_row) * in.source_length;
      drop_negligible(alpha + offset, without_negligible + offset, (end - begin) * in.source_length);
    }
  });
}

// The forward a block of scores at a time (for_each_score_block): per block S = q'.k (the
// bfloat16 GEMM's float32 sums for bfloat16_gemms), W from S (weights_of_scores), then its
// rows of C = W V; W goes to the returned weights' rows, or to a buffer without them, and
// W V takes it without its negligible weights (see negligible_weight): a buffer of their
// own holds it when W is returned.  bfloat16_gemms: W is float32, rounded to bfloat16 (as
// it is returned) before W V, which takes returned negligible weights as they are (the
// bfloat16 dot-product instruction takes subnormals as zeros without an assist).  A
// bfloat16 decode step computes C = W v with W in float32 and v as stored instead
// (bfloat16_decode_context), over all its N S scores at once.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_blas(const PreparedInputs& in, bool return_weights,
                                                                      const at::Tensor& original_query) {
  const bool bfloat16 = in.bfloat16_gemms;
  const at::ScalarType compute_dtype = in.compute_dtype;
  at::Tensor logsumexp = at::empty({in.batch, in.query_length}, in.query.options().dtype(compute_dtype));
  at::Tensor context, weights;
  if (bfloat16 && in.query_length == 1) {
    const at::Tensor scores = bfloat16_matmul_nt(in.query, in.keys);
    weights = at::empty_like(scores);
    const at::Tensor product_weights = return_weights ? at::empty_like(scores) : weights;
    weights_of_scores<float>(in, scores, weights, 0, logsumexp.mutable_data_ptr<float>(), return_weights,
                             return_weights ? product_weights.mutable_data_ptr<float>() : nullptr);
    context = bfloat16_decode_context(product_weights, in.values);
  } else {
    // The dtype W V runs in: bfloat16 for bfloat16_gemms (W rounded, into the returned
    // weights or a buffer of its own), else the compute dtype.
    const at::ScalarType product_dtype = bfloat16 ? at::kBFloat16 : compute_dtype;
    context = at::empty({in.batch, in.query_length, in.value_dim}, in.query.options().dtype(product_dtype));
    if (return_weights) {
      weights = at::empty({in.batch, in.query_length, in.source_length}, in.query.options().dtype(product_dtype));
    }
    const at::Tensor scores = score_block_buffer(in, compute_dtype);
    const at::Tensor weights_buffer = score_block_buffer(in, compute_dtype);
    const at::Tensor rounded_buffer = bfloat16 && !return_weights ? score_block_buffer(in, at::kBFloat16) : at::Tensor();
    const at::Tensor prepared_query = !bfloat16 && in.score == ScoreKind::kCosine ? unit_rows(in.query, cosine_norm_floor_of(in.input_dtype)) : in.query;
    const at::Tensor keys_transposed = in.keys.transpose(1, 2);
    for_each_score_block(in, [&](const ScoreBlock& block) {
      at::Tensor scores_block = block.in_buffer(scores);
      if (bfloat16) {
        bfloat16_matmul_nt_out(scores_block, block.rows_of(in.query), block.batch_of(in.keys));
      } else {
        batched_matmul_into(scores_block, block.rows_of(prepared_query), block.batch_of(keys_transposed));
      }
      at::Tensor weights_block =
          return_weights ? block.rows_of(weights) : block.in_buffer(bfloat16 ? rounded_buffer : weights_buffer);
      at::Tensor product_weights = weights_block;
      if (bfloat16) {
        at::Tensor float_weights = block.in_buffer(weights_buffer);
        weights_of_scores<float>(in, scores_block, float_weights, block.first_row,
                                 logsumexp.mutable_data_ptr<float>(), return_weights, nullptr,
                                 weights_block.mutable_data_ptr<c10::BFloat16>());
      } else {
        if (return_weights) product_weights = block.in_buffer(weights_buffer);
        AT_DISPATCH_FLOATING_TYPES(compute_dtype, "attention_forward_blas", [&] {
          weights_of_scores<scalar_t>(in, scores_block, weights_block, block.first_row,
                                      logsumexp.mutable_data_ptr<scalar_t>(), return_weights,
                                      return_weights ? product_weights.mutable_data_ptr<scalar_t>() : nullptr);
        });
      }
      batched_matmul_into(block.rows_of(context), product_weights, block.batch_of(in.values));
    });
  }
  if (context.scalar_type() != in.input_dtype) context = context.to(in.input_dtype);
  if (!return_weights) {
    weights = at::empty({0}, original_query.options());
  } else if (weights.scalar_type() != in.input_dtype) {
    weights = weights.to(in.input_dtype);
  }
  return {context, weights, logsumexp};
}

// ---------------------------------------------------------------- ops

// Whether the row kernel reads float16 / bfloat16 keys and values as they are stored: it
// widens a key or value row again for every query row that reads it, where a float32 copy
// widens it once but writes and reads it again through memory.  Measured on two cores
// (N = 32, S = D = 256, dot and additive scores): bfloat16 (a shift) in place was faster or
// even up to 15 rows a key, 10% slower at 64; float16 (ten vector operations) was even at 1
// to 2 rows and 1.7x slower at 64 (additive).  So: in place while the elements read, each
// counted once for every row that reads it, are at most 16 (bfloat16) or 2 (float16)
// times the elements a copy would convert.  Keys shared by the batch (the location
// score's W_a, S x D) are read by all N T rows and the values (N x S x Dv) by T rows each;
// the kernel takes keys and values of one element type, so a copy converts both (a decode
// step's values: 4 to 30 ms of 44 at N = 64, S = 1024, D = 512 in bfloat16).
bool widen_in_the_kernel(const PreparedInputs& in) {
  const at::ScalarType dtype = in.keys.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  const double limit = dtype == at::kBFloat16 ? 16 : 2;
  const double key_elements = static_cast<double>(in.shared_keys ? 1 : in.batch) * in.source_length * in.score_dim;
  const double value_elements = static_cast<double>(in.batch) * in.source_length * in.value_dim;
  const double key_reads = key_elements * (in.shared_keys ? in.batch * in.query_length : in.query_length);
  const double value_reads = value_elements * in.query_length;
  return key_reads + value_reads <= limit * (key_elements + value_elements);
}

// The forward's row kernel over the N*T query rows, keys and values read in E.
template <typename T, typename E>
void forward_rows_in_parallel(const PreparedInputs& in, at::Tensor& context, at::Tensor& weights,
                              at::Tensor& logsumexp, bool return_weights) {
  AttentionProblem<T, E> problem = problem_of<T, E>(in);
  problem.negligible_gap = negligible_gap<T>();  // the returned weights are written apart
  ForwardOutputs<T> out;
  out.context = context.mutable_data_ptr<T>();
  out.weights = return_weights ? weights.mutable_data_ptr<T>() : nullptr;
  out.logsumexp = logsumexp.mutable_data_ptr<T>();
  const ForwardKernel<T, E> kernel = forward_kernel<T, E>(in.score);
  const int64_t row_cost = std::max<int64_t>(1, in.source_length * (in.score_dim + in.value_dim));
  const int64_t grain = std::max<int64_t>(1, 32768 / row_cost);
  at::parallel_for(0, in.batch * in.query_length, grain,
                   [&](int64_t begin, int64_t end) { kernel(problem, out, begin, end); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values, const std::optional<at::Tensor>& v,
    const std::optional<at::Tensor>& bias, std::string_view score, double scale,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& key_padding_mask, bool causal,
    std::optional<int64_t> window, const std::optional<at::Tensor>& center, bool gaussian, bool return_weights) {
  PreparedInputs in = prepare_inputs("attention_forward", Pass::kForward, query, keys, values, v, bias, score, scale,
                                     lengths, key_padding_mask, causal, window, center, gaussian);
  if (use_blas_path(in)) {
    if (!in.bfloat16_gemms) keys_and_values_in_compute_dtype(in);
    return attention_forward_blas(in, return_weights, query);
  }
  if (!widen_in_the_kernel(in)) keys_and_values_in_compute_dtype(in);
  const auto options = in.query.options();
  at::Tensor context = at::empty({in.batch, in.query_length, in.value_dim}, options);
  at::Tensor weights = return_weights ? at::empty({in.batch, in.query_length, in.source_length}, options)
                                      : at::empty({0}, query.options());
  at::Tensor logsumexp = at::empty({in.batch, in.query_length}, options);
  switch (in.keys.scalar_type()) {
    case at::kDouble:
      forward_rows_in_parallel<double, double>(in, context, weights, logsumexp, return_weights);
      break;
    case at::kHalf:
      forward_rows_in_parallel<float, c10::Half>(in, context, weights, logsumexp, return_weights);
      break;
    case at::kBFloat16:
      forward_rows_in_parallel<float, c10::BFloat16>(in, context, weights, logsumexp, return_weights);
      break;
    default:
      forward_rows_in_parallel<float, float>(in, context, weights, logsumexp, return_weights);
  }
  if (in.input_dtype != in.compute_dtype) {
    context = context.to(in.input_dtype);
    if (return_weights) weights = weights.to(in.input_dtype);
  }
  return {context, weights, logsumexp};
}

// blas_backward_rows over rows [row_begin, row_end), in parallel (grad_center: the (N, T)
// gradient of the centres, or undefined).
template <typename T>
void backward_rows_in_parallel(const PreparedInputs& in, const BackwardRowBuffers<T>& buffers,
                               const at::Tensor& logsumexp, const at::Tensor& grad_center, bool drop_negligible,
                               int64_t row_begin, int64_t row_end) {
  AttentionProblem<T> problem = masks_of<T>(in);
  if (drop_negligible) problem.negligible_gap = negligible_gap<T>();
  const T* lse = logsumexp.const_data_ptr<T>();
  T* center_data = grad_center.defined() ? grad_center.mutable_data_ptr<T>() : nullptr;
  at::parallel_for(row_begin, row_end, std::max<int64_t>(1, 16384 / in.source_length), [&](int64_t begin, int64_t end) {
    run_for_this_cpu<&blas_backward_rows<T>>(problem, buffers, lse, center_data, begin, end);
  });
}

// The input gradients of the matrix-multiply backward from dE and W, a block of rows at a
// time: the block's rows of grad_query = dE K, and W^T dC and dE^T Q into grad_values' and
// grad_keys' rows of the block's batch elements, set by the first block to reach them and
// added to by those after it (the blocks of an element whose rows are split, and for keys
// shared by the batch, whose gradient sums all N T rows, every block).  query_rows and
// key_rows: q and k as dE takes them (the cosine's unit vectors); the gradients have their
// dtype and are allocated by the first add (so a bfloat16 backward whose GEMMs run once over
// all rows frees its float32 score buffers first).
struct BackwardGemms {
  BackwardGemms(const PreparedInputs& in, const at::Tensor& query_rows, const at::Tensor& key_rows,
                const at::Tensor& grad_context)
      : query_rows(query_rows), key_rows(key_rows), grad_context(grad_context), in(in) {}

  // grad_scores and weights: (block.batch, block.rows, S), contiguous.
  void add(const ScoreBlock& block, const at::Tensor& grad_scores, const at::Tensor& weights) {
    if (!grad_query.defined()) {
      const auto options = query_rows.options();
      grad_query = at::empty({in.batch, in.query_length, in.score_dim}, options);
      grad_keys = at::empty({in.shared_keys ? 1 : in.batch, in.source_length, in.score_dim}, options);
      grad_values = at::empty({in.batch, in.source_length, in.value_dim}, options);
    }
    batched_matmul_into(block.rows_of(grad_query), grad_scores, block.batch_of(key_rows));
    set_or_add(block.batch_of(grad_values), weights.transpose(1, 2), block.rows_of(grad_context), block.t == 0);
    if (in.shared_keys) {
      set_or_add(grad_keys, grad_scores.view({1, -1, in.source_length}).transpose(1, 2),
                 block.rows_of(query_rows).reshape({1, -1, in.score_dim}), block.first_row == 0);
    } else {
      set_or_add(block.batch_of(grad_keys), grad_scores.transpose(1, 2), block.rows_of(query_rows), block.t == 0);
    }
  }

  const at::Tensor query_rows, key_rows, grad_context;
  at::Tensor grad_query, grad_keys, grad_values;

 private:
  // out = a @ b, or out += a @ b through a scratch product.
  void set_or_add(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool set) {
    if (set) {
      batched_matmul_into(out, a, b);
      return;
    }
    if (scratch.numel() < out.numel()) scratch = at::empty({out.numel()}, out.options());
    at::Tensor product = scratch.narrow(0, 0, out.numel()).view(out.sizes());
    batched_matmul_into(product, a, b);
    out.add_(product);
  }

  const PreparedInputs& in;
  at::Tensor scratch;
};

// The matrix-multiply backward a block of scores at a time (for_each_score_block): q.k and
// dC v^T into float32 (or float64) buffers, the block's row pass makes dE and W, and the
// block's GEMMs (gemms.add) follow at once, so no (N, T, S) tensor exists.
// bfloat16_gemms: q.k and dC v^T from the bfloat16 GEMM, dE and W rounded to bfloat16 as
// the GEMMs' operands.  Their GEMMs follow each block where its batch elements are whole and
// have keys of their own; otherwise (an element's rows split over blocks, keys shared by the
// batch) dE and W are rounded into (N, T, S) tensors whose GEMMs run once over all the rows
// at the end, since added a block at a time each partial product would be rounded to
// bfloat16.
void backward_in_blocks(const PreparedInputs& in, BackwardGemms& gemms, const at::Tensor& grad_weights,
                        const at::Tensor& logsumexp, const at::Tensor& grad_center) {
  const bool bfloat16 = in.bfloat16_gemms;
  const at::ScalarType dtype = bfloat16 ? at::kFloat : in.compute_dtype;
  const bool gemms_per_block =
      !bfloat16 || (largest_score_block(in).second == in.query_length && !in.shared_keys);
  at::Tensor raw = score_block_buffer(in, dtype), grad_alpha = score_block_buffer(in, dtype);
  const at::Tensor weights = bfloat16 ? at::Tensor() : score_block_buffer(in, dtype);
  at::Tensor rounded_grad_scores, rounded_weights;  // bfloat16: a block's, or all (N, T, S)
  if (bfloat16) {
    rounded_grad_scores = gemms_per_block ? score_block_buffer(in, at::kBFloat16)
                                          : at::empty({in.batch, in.query_length, in.source_length}, in.query.options());
    rounded_weights = at::empty_like(rounded_grad_scores);
  }
  const at::Tensor keys_transposed = gemms.key_rows.transpose(1, 2), values_transposed = in.values.transpose(1, 2);
  for_each_score_block(in, [&](const ScoreBlock& block) {
    at::Tensor raw_block = block.in_buffer(raw), grad_alpha_block = block.in_buffer(grad_alpha);
    if (bfloat16) {  // q.k of the raw query (the cosine's norms divided out in the row pass)
      bfloat16_matmul_nt_out(raw_block, block.rows_of(in.query), block.batch_of(in.keys));
      bfloat16_matmul_nt_out(grad_alpha_block, block.rows_of(gemms.grad_context), block.batch_of(in.values));
    } else {
      batched_matmul_into(raw_block, block.rows_of(gemms.query_rows), block.batch_of(keys_transposed));
      batched_matmul_into(grad_alpha_block, block.rows_of(gemms.grad_context), block.batch_of(values_transposed));
    }
    if (grad_weights.defined()) grad_alpha_block.add_(block.rows_of(grad_weights));
    // The operands of the block's GEMMs: dE and W
    at::Tensor grad_scores_block = raw_block, weights_block = bfloat16 ? at::Tensor() : block.in_buffer(weights);
    if (bfloat16) {
      const auto block_of = [&](const at::Tensor& x) { return gemms_per_block ? block.in_buffer(x) : block.rows_of(x); };
      grad_scores_block = block_of(rounded_grad_scores);
      weights_block = block_of(rounded_weights);
    }
    AT_DISPATCH_FLOATING_TYPES(dtype, "attention_backward_blas", [&] {
      BackwardRowBuffers<scalar_t> buffers;
      buffers.raw = raw_block.mutable_data_ptr<scalar_t>();
      buffers.grad_weights = grad_alpha_block.mutable_data_ptr<scalar_t>();
      buffers.first_row = block.first_row;
      if (bfloat16) {
        buffers.rounded_grad_scores = grad_scores_block.mutable_data_ptr<c10::BFloat16>();
        buffers.rounded_weights = weights_block.mutable_data_ptr<c10::BFloat16>();
      } else {
        buffers.weights = weights_block.mutable_data_ptr<scalar_t>();
      }
      backward_rows_in_parallel(in, buffers, logsumexp, grad_center, !grad_weights.defined(), block.first_row,
                                block.row_end());
    });
    if (gemms_per_block) gemms.add(block, grad_scores_block, weights_block);
  });
  if (!gemms_per_block) {
    raw.reset();
    grad_alpha.reset();
    gemms.add(ScoreBlock{0, in.batch, 0, in.query_length, 0}, rounded_grad_scores, rounded_weights);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_context, const std::optional<at::Tensor>& grad_weights, const at::Tensor& query,
    const at::Tensor& keys, const at::Tensor& values, const std::optional<at::Tensor>& v,
    const std::optional<at::Tensor>& bias, std::string_view score, double scale,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& key_padding_mask, bool causal,
    std::optional<int64_t> window, const std::optional<at::Tensor>& center, bool gaussian,
    const at::Tensor& logsumexp, bool values_are_keys) {
  const char* op = "attention_backward";
  PreparedInputs in = prepare_inputs(op, Pass::kBackward, query, keys, values, v, bias, score, scale, lengths,
                                     key_padding_mask, causal, window, center, gaussian);
  TORCH_CHECK_VALUE(!values_are_keys || keys.sizes() == values.sizes(), op,
                    ": values_are_keys needs keys and values of one shape, got keys ", keys.sizes(), " and values ",
                    values.sizes());
  const auto check_like_context = [&](const char* name, const at::Tensor& tensor) {  // (N, T, Dv), query's dtype
    check_float_like(op, name, tensor, query);
    TORCH_CHECK_VALUE(tensor.dim() == 3 && tensor.size(0) == in.batch && tensor.size(1) == in.query_length &&
                          tensor.size(2) == in.value_dim,
                      op, ": ", name, " must be (N=", in.batch, ", T=", in.query_length, ", Dv=", in.value_dim,
                      "), got shape ", tensor.sizes());
  };
  check_like_context("grad_context", grad_context);
  check_cpu(op, "logsumexp", logsumexp);
  TORCH_CHECK_TYPE(logsumexp.scalar_type() == in.compute_dtype, op, ": logsumexp must be ", in.compute_dtype,
                   " (the accumulation dtype), got ", logsumexp.scalar_type());
  TORCH_CHECK_VALUE(logsumexp.dim() == 2 && logsumexp.size(0) == in.batch && logsumexp.size(1) == in.query_length, op,
                    ": logsumexp must be (N=", in.batch, ", T=", in.query_length, "), got shape ", logsumexp.sizes());
  const bool blas = (in.score == ScoreKind::kDot || in.score == ScoreKind::kCosine) && use_blas_path(in);
  const bool bfloat16 = in.bfloat16_gemms;  // only on the matrix-multiply path
  const at::Tensor grad_context_ = bfloat16 ? grad_context.contiguous() : in_dtype(grad_context, in.compute_dtype).contiguous();
  const at::Tensor logsumexp_ = logsumexp.contiguous();
  at::Tensor grad_weights_;
  if (grad_weights.has_value() && grad_weights->defined()) {
    check_float_like(op, "grad_weights", *grad_weights, query);
    TORCH_CHECK_VALUE(grad_weights->dim() == 3 && grad_weights->size(0) == in.batch &&
                          grad_weights->size(1) == in.query_length && grad_weights->size(2) == in.source_length,
                      op, ": grad_weights must be (N=", in.batch, ", T=", in.query_length, ", S=", in.source_length,
                      "), got shape ", grad_weights->sizes());
    grad_weights_ = in_dtype(*grad_weights, in.compute_dtype).contiguous();
  }
  if (!bfloat16) keys_and_values_in_compute_dtype(in);  // only now that every argument is checked

  const auto options = in.query.options().dtype(in.compute_dtype);
  const auto cast = [&](const at::Tensor& t) { return t.scalar_type() == in.input_dtype ? t : t.to(in.input_dtype); };
  // A fresh empty tensor for each absent gradient: outputs must not alias.
  const auto empty = [&] { return at::empty({0}, query.options()); };
  if (blas) {
    const bool wants_center = in.gaussian && in.center.defined(), cosine = in.score == ScoreKind::kCosine;
    at::Tensor grad_center = wants_center ? at::zeros({in.batch, in.query_length}, options) : at::Tensor();
    // bfloat16: query, keys, values and grad_context as the caller's (in.bfloat16_gemms),
    // the cosine's unit vectors in bfloat16 for dE K^ and dE^T Q^
    const double floor = cosine_norm_floor_of(in.input_dtype);
    const at::Tensor query_rows = cosine ? unit_rows(in.query, floor) : in.query;
    const at::Tensor key_rows = cosine ? unit_rows(in.keys, floor) : in.keys;
    BackwardGemms gemms(in, query_rows, key_rows, grad_context_);
    backward_in_blocks(in, gemms, grad_weights_, logsumexp_, grad_center);
    at::Tensor grad_query = gemms.grad_query, grad_keys = gemms.grad_keys, grad_values = gemms.grad_values;
    if (cosine) {
      through_unit_rows(grad_query, in.query, floor);
      through_unit_rows(grad_keys, in.shared_keys ? in.keys.narrow(0, 0, 1) : in.keys, floor);
    }
    if (values_are_keys) grad_keys.add_(grad_values);
    return {cast(grad_query), cast(grad_keys), values_are_keys ? empty() : cast(grad_values), empty(), empty(),
            wants_center ? grad_center.to(center->scalar_type()) : empty()};
  }
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(in.batch, at::get_num_threads()));
  // Zeroed by the kernel, batch by batch (backward_batches).
  at::Tensor grad_query = at::empty({in.batch, in.query_length, in.score_dim}, options);
  // Keys shared by the batch: one (S, D) gradient per chunk, summed over the chunks at the end.
  at::Tensor grad_keys = at::empty({in.shared_keys ? chunks : in.batch, in.source_length, in.score_dim}, options);
  at::Tensor grad_values =
      values_are_keys ? at::Tensor() : at::empty({in.batch, in.source_length, in.value_dim}, options);
  const bool wants_grad_center = in.gaussian && in.center.defined();
  at::Tensor grad_center = wants_grad_center ? at::empty({in.batch, in.query_length}, options) : at::Tensor();
  const bool additive = in.score == ScoreKind::kAdditive;
  // Per chunk: grad_v (Da) then grad_bias (Da), summed over the chunks at the end.
  at::Tensor parameter_sums = at::zeros({chunks, 2, additive ? in.score_dim : 0}, options);

  AT_DISPATCH_FLOATING_TYPES(in.compute_dtype, "attention_backward", [&] {
    AttentionProblem<scalar_t> problem = problem_of<scalar_t>(in);
    if (!grad_weights_.defined()) problem.negligible_gap = negligible_gap<scalar_t>();  // see negligible_gap
    BackwardInputs<scalar_t> inputs;
    inputs.grad_context = grad_context_.const_data_ptr<scalar_t>();
    inputs.grad_weights = grad_weights_.defined() ? grad_weights_.const_data_ptr<scalar_t>() : nullptr;
    inputs.logsumexp = logsumexp_.const_data_ptr<scalar_t>();
    BackwardOutputs<scalar_t> out;
    out.grad_query = grad_query.mutable_data_ptr<scalar_t>();
    out.grad_keys = grad_keys.mutable_data_ptr<scalar_t>();
    out.grad_keys_batch_stride = in.shared_keys ? 0 : in.source_length * in.score_dim;
    out.grad_values = values_are_keys ? nullptr : grad_values.mutable_data_ptr<scalar_t>();
    out.values_are_keys = values_are_keys;
    out.grad_center = wants_grad_center ? grad_center.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* sums = parameter_sums.mutable_data_ptr<scalar_t>();
    const int64_t parameter_dim = additive ? in.score_dim : 0;
    const bool has_bias = in.bias.defined();
    const BackwardKernel<scalar_t> kernel = backward_kernel<scalar_t>(in.score);
    const int64_t batch = in.batch;
    at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        scalar_t* grad_v_sum = sums + chunk * 2 * parameter_dim;
        scalar_t* grad_bias_sum = has_bias ? grad_v_sum + parameter_dim : nullptr;
        BackwardOutputs<scalar_t> chunk_out = out;
        if (in.shared_keys) chunk_out.grad_keys += chunk * in.source_length * in.score_dim;
        kernel(problem, inputs, chunk_out, batch * chunk / chunks, batch * (chunk + 1) / chunks, grad_v_sum,
               grad_bias_sum);
      }
    });
  });
  if (in.shared_keys) {
    grad_keys = grad_keys.sum(0, /*keepdim=*/true);
    if (in.score == ScoreKind::kCosine) {
      through_unit_rows(grad_keys, in.keys.narrow(0, 0, 1), cosine_norm_floor_of(in.input_dtype));
    }
  }

  at::Tensor grad_v = additive ? cast(parameter_sums.select(1, 0).sum(0)) : empty();
  at::Tensor grad_bias = additive && in.bias.defined() ? cast(parameter_sums.select(1, 1).sum(0)) : empty();
  return {cast(grad_query),
          cast(grad_keys),
          values_are_keys ? empty() : cast(grad_values),
          grad_v,
          grad_bias,
          wants_grad_center ? grad_center.to(center->scalar_type()) : empty()};
}

// ---------------------------------------------------------------- sample_positions

// Weights of any dtype as double, for fastattn::draw_position / argmax_position
// (csrc/common/sampling_math.h, shared with the CUDA kernel).
struct WeightToDouble {
  template <typename T>
  double operator()(T weight) const { return static_cast<double>(weight); }
};

// fastattn::argmax_position of rows [row_begin, row_end) of float32 or float64 weights, in
// loops that vectorise (run_for_this_cpu: the AVX2 clone where the CPU has it): each row's
// largest weight that is not NaN, then the first position holding it; 0 when the row's first
// weight is NaN, as argmax_position (whose strict > never moves off it).
template <typename T>
void first_argmax_rows(const T* weights, int64_t source_length, int64_t* chosen, int64_t row_begin, int64_t row_end) {
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* row_weights = weights + row * source_length;
    T largest = row_weights[0];
    chosen[row] = 0;
    if (largest != largest) continue;
#pragma omp simd reduction(max : largest)
    for (int64_t j = 0; j < source_length; ++j) largest = row_weights[j] > largest ? row_weights[j] : largest;
    const int64_t first = first_holding(row_weights, ContiguousKeys{0}, source_length, largest);
    if (first < source_length) chosen[row] = first;
  }
}

at::Tensor sample_positions_cpu(const at::Tensor& weights, bool sample, std::optional<at::Generator> generator) {
  const char* op = "sample_positions";
  check_cpu(op, "weights", weights);
  TORCH_CHECK_TYPE(is_supported_float(weights.scalar_type()), op,
                   ": weights must be float32, float64, float16 or bfloat16, got ", weights.scalar_type());
  TORCH_CHECK_VALUE(weights.dim() == 3, op, ": weights must be (N, T, S), got shape ", weights.sizes());
  const at::Tensor rows_of_weights = weights.contiguous();
  const int64_t rows = weights.size(0) * weights.size(1), source_length = weights.size(2);
  at::Tensor index = at::empty({weights.size(0), weights.size(1)}, weights.options().dtype(at::kLong));
  if (rows == 0) return index;
  if (source_length == 0) return index.zero_();  // every row written below otherwise
  std::vector<double> uniforms;
  if (sample) {
    uniforms.resize(rows);
    auto* cpu_generator =
        at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(cpu_generator->mutex_);
    for (int64_t row = 0; row < rows; ++row) {  // 53 random bits -> [0, 1)
      uniforms[row] = static_cast<double>(cpu_generator->random64() >> 11) * (1.0 / 9007199254740992.0);
    }
  }
  int64_t* chosen = index.mutable_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(), "sample_positions", [&] {
    const scalar_t* data = rows_of_weights.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / source_length), [&](int64_t begin, int64_t end) {
      if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
        if (!sample) {
          run_for_this_cpu<&first_argmax_rows<scalar_t>>(data, source_length, chosen, begin, end);
          return;
        }
      }
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* row_weights = data + row * source_length;
        chosen[row] = sample ? fastattn::draw_position(row_weights, source_length, uniforms[row], WeightToDouble{})
                             : fastattn::argmax_position(row_weights, source_length, WeightToDouble{});
      }
    });
  });
  return index;
}

// ---------------------------------------------------------------- fast_tanh

at::Tensor fast_tanh_cpu(const at::Tensor& x) {
  check_cpu("fast_tanh", "x", x);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "fast_tanh: x must be float32, got ", x.scalar_type());
  const at::Tensor input = x.contiguous();
  at::Tensor output = at::empty_like(input);
  void (*kernel)(const float*, float*, int64_t) = &fast_tanh_baseline;
#ifdef FASTATTN_AVX2_CLONES
  kernel = kernel_for_this_cpu(kernel, &fast_tanh_avx2, &fast_tanh_avx512);
#endif
  const float* in = input.const_data_ptr<float>();
  float* out = output.mutable_data_ptr<float>();
  at::parallel_for(0, input.numel(), 16384,
                   [&](int64_t begin, int64_t end) { kernel(in + begin, out + begin, end - begin); });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
  m.impl("sample_positions", &sample_positions_cpu);
  m.impl("fast_tanh", &fast_tanh_cpu);
}
