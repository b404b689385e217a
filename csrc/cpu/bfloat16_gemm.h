// bfloat16_matmul_nt: C = A B^T in float32 for bfloat16 A (batch, M, K) and B (batch, N, K)
// (B's batch stride may be 0: keys shared by the batch), with the AVX512-BF16 dot-product
// instruction (vdpbf16ps: two bfloat16 products, exact in float32, added to each float32
// lane).  It is the float32-output GEMM that ATen lacks on the CPU: a bfloat16 at::bmm
// rounds its output to bfloat16, and a float32 at::bmm on widened copies runs at half the
// rate.  The attention's matrix-multiply path takes its scores (q k^T) and, in the
// backward, dW = dC v^T from it; a bfloat16 LSTM/GRU layer's forward its input projection
// x W_ih^T (bfloat16_matmul_nt_out, into the gate columns of its saved rows) and, through
// pack and gemm, each step's h W_hh^T (W_hh packed once a call, csrc/cpu/recurrent.cpp).  Measured on the 2-core AMD EPYC (Zen 4) of this project at
// batch 32, M = N = 64, K = 256: 173 us, against 196 us for a bfloat16 at::bmm (oneDNN,
// output rounded) and 386-406 us for a float32 at::bmm.
// How: B is packed once per batch element (per thread) into panels of 16 of its rows, the
// pairs of each row interleaved as vdpbf16ps reads them (a 16 x 16 transpose of 32-bit
// pairs); a micro-kernel keeps 6 rows x 32 columns of C in 12 registers and broadcasts a
// pair of A's row per step.  An odd K ends with a zero partner in A and in the pack.
// bfloat16_decode_context: W v for a decode step's float32 weights and bfloat16 values, the
// values widened in registers (AVX-512), read once.
// Not handled: strides other than 1 along K (callers pass contiguous rows); CPUs without
// AVX512-BF16 (callers check bfloat16_matmul_nt_available() and take their float32 path);
// subnormal bfloat16 inputs and sums, which the instruction flushes to zero (|x| < 1.2e-38).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "isa.h"

#ifdef FASTATTN_AVX512_BF16_CLONES
#include <immintrin.h>
#endif

namespace fastattn {

inline bool bfloat16_matmul_nt_available() { return use_avx512_bf16_kernels(); }

#ifdef FASTATTN_AVX512_BF16_CLONES
namespace bfloat16_gemm {

constexpr int64_t kPanel = 16;  // columns of C in one register of float32 sums
constexpr int kRowBlock = 6;    // rows of C a micro-kernel keeps: 6 x 2 panels, 12 registers

inline int64_t pairs_of(int64_t K) { return (K + 1) / 2; }
inline int64_t panels_of(int64_t N) { return (N + kPanel - 1) / kPanel; }
// uint16 elements of a packed panel: its pairs, each 16 columns x 2
inline int64_t panel_elements(int64_t K) { return pairs_of(K) * 2 * kPanel; }

// rows[i] holds 16 32-bit words of row i; on exit rows[j] holds word j of every row.
FASTATTN_TARGET_AVX512_BF16 inline void transpose_16x16(__m512i rows[16]) {
  __m512i a[16], b[16];
  for (int p = 0; p < 8; ++p) {
    a[2 * p] = _mm512_unpacklo_epi32(rows[2 * p], rows[2 * p + 1]);
    a[2 * p + 1] = _mm512_unpackhi_epi32(rows[2 * p], rows[2 * p + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // b[4 g + c], lane L: rows 4g .. 4g+3 at word 4 L + c
    b[4 * g] = _mm512_unpacklo_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 1] = _mm512_unpackhi_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 2] = _mm512_unpacklo_epi64(a[4 * g + 1], a[4 * g + 3]);
    b[4 * g + 3] = _mm512_unpackhi_epi64(a[4 * g + 1], a[4 * g + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // word 4 L + c: lane L of b[c], b[4 + c], b[8 + c], b[12 + c]
    const __m512i low = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44), high = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
    const __m512i low2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
    const __m512i high2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
    rows[c] = _mm512_shuffle_i32x4(low, low2, 0x88);
    rows[4 + c] = _mm512_shuffle_i32x4(low, low2, 0xDD);
    rows[8 + c] = _mm512_shuffle_i32x4(high, high2, 0x88);
    rows[12 + c] = _mm512_shuffle_i32x4(high, high2, 0xDD);
  }
}

// B (N, K), rows ldb apart, into panels: packed[panel][pair][column][2], zeros past N and K.
FASTATTN_TARGET_AVX512_BF16 inline void pack(const uint16_t* b, int64_t N, int64_t K, int64_t ldb, uint16_t* packed) {
  const int64_t pairs = pairs_of(K);
  for (int64_t panel = 0; panel < panels_of(N); ++panel) {
    uint16_t* out = packed + panel * panel_elements(K);
    const int64_t first = panel * kPanel, columns = std::min(kPanel, N - first);
    int64_t pair = 0;
    if (columns == kPanel) {
      for (; pair + 16 <= K / 2; pair += 16) {
        __m512i rows[16];
        for (int i = 0; i < 16; ++i) rows[i] = _mm512_loadu_si512(b + (first + i) * ldb + 2 * pair);
        transpose_16x16(rows);
        for (int j = 0; j < 16; ++j) _mm512_storeu_si512(out + (pair + j) * 2 * kPanel, rows[j]);
      }
    }
    for (; pair < pairs; ++pair) {
      for (int64_t c = 0; c < kPanel; ++c) {
        const int64_t k = 2 * pair;
        const uint16_t* row = b + (first + c) * ldb;
        out[(pair * kPanel + c) * 2] = c < columns ? row[k] : 0;
        out[(pair * kPanel + c) * 2 + 1] = c < columns && k + 1 < K ? row[k + 1] : 0;
      }
    }
  }
}

// sums[r][p] += the products of the pair two[r] of A's row r with the pairs at b (panel p
// at b + p * panel_stride).
template <int kRows, int kPanels>
FASTATTN_TARGET_AVX512_BF16 inline void pair_step(__m512 (&sums)[kRows][kPanels], const int32_t (&two)[kRows],
                                                  const uint16_t* b, int64_t panel_stride) {
  __m512bh columns[kPanels];
  for (int p = 0; p < kPanels; ++p) columns[p] = (__m512bh)_mm512_loadu_si512(b + p * panel_stride);
  for (int r = 0; r < kRows; ++r) {
    const __m512bh broadcast = (__m512bh)_mm512_set1_epi32(two[r]);
    for (int p = 0; p < kPanels; ++p) sums[r][p] = _mm512_dpbf16_ps(sums[r][p], broadcast, columns[p]);
  }
}

// kRows rows of C (ldc apart) over kPanels panels from `panel`, the last holding
// `columns` - (kPanels - 1) * 16 valid columns.
template <int kRows, int kPanels>
FASTATTN_TARGET_AVX512_BF16 inline void micro_kernel(const uint16_t* a, int64_t lda, int64_t K, const uint16_t* panel,
                                                     int64_t columns, float* c, int64_t ldc) {
  const int64_t panel_stride = panel_elements(K);
  __m512 sums[kRows][kPanels];
  for (int r = 0; r < kRows; ++r) {
    for (int p = 0; p < kPanels; ++p) sums[r][p] = _mm512_setzero_ps();
  }
  const int64_t whole_pairs = K / 2;
  int32_t two[kRows];  // a[r][2 pair], a[r][2 pair + 1]
  for (int64_t pair = 0; pair < whole_pairs; ++pair) {
    for (int r = 0; r < kRows; ++r) std::memcpy(&two[r], a + r * lda + 2 * pair, sizeof(int32_t));
    pair_step<kRows, kPanels>(sums, two, panel + pair * 2 * kPanel, panel_stride);
  }
  if (K % 2 != 0) {  // the last element of each row, its partner 0
    for (int r = 0; r < kRows; ++r) two[r] = static_cast<int32_t>(a[r * lda + K - 1]);
    pair_step<kRows, kPanels>(sums, two, panel + whole_pairs * 2 * kPanel, panel_stride);
  }
  for (int r = 0; r < kRows; ++r) {
    for (int p = 0; p < kPanels; ++p) {
      const int64_t left = columns - p * kPanel;
      if (left >= kPanel) {
        _mm512_storeu_ps(c + r * ldc + p * kPanel, sums[r][p]);
      } else {
        _mm512_mask_storeu_ps(c + r * ldc + p * kPanel, static_cast<__mmask16>((1u << left) - 1), sums[r][p]);
      }
    }
  }
}

template <int kRows>
FASTATTN_TARGET_AVX512_BF16 inline void row_block(const uint16_t* a, int64_t lda, int64_t K, const uint16_t* packed,
                                                  int64_t N, float* c, int64_t ldc) {
  const int64_t panel_stride = panel_elements(K);
  int64_t first = 0;
  for (; N - first > kPanel; first += 2 * kPanel) {
    micro_kernel<kRows, 2>(a, lda, K, packed + (first / kPanel) * panel_stride, N - first, c + first, ldc);
  }
  if (first < N) micro_kernel<kRows, 1>(a, lda, K, packed + (first / kPanel) * panel_stride, N - first, c + first, ldc);
}

// C (M, N) = A (M, K) packed-B^T, one thread.
FASTATTN_TARGET_AVX512_BF16 inline void gemm(const uint16_t* a, int64_t M, int64_t lda, int64_t K,
                                             const uint16_t* packed, int64_t N, float* c, int64_t ldc) {
  int64_t m = 0;
  for (; m + kRowBlock <= M; m += kRowBlock) row_block<kRowBlock>(a + m * lda, lda, K, packed, N, c + m * ldc, ldc);
  const uint16_t* rest = a + m * lda;
  float* out = c + m * ldc;
  switch (M - m) {
    case 5: row_block<5>(rest, lda, K, packed, N, out, ldc); break;
    case 4: row_block<4>(rest, lda, K, packed, N, out, ldc); break;
    case 3: row_block<3>(rest, lda, K, packed, N, out, ldc); break;
    case 2: row_block<2>(rest, lda, K, packed, N, out, ldc); break;
    case 1: row_block<1>(rest, lda, K, packed, N, out, ldc); break;
    default: break;
  }
}

// kVectors registers (16 columns each; the last masked by `last`) of y += sum_c w[c] *
// row keys[c] of `rows` (bfloat16, row stride ld), the sums in registers over the rows.
template <int kVectors>
FASTATTN_TARGET_AVX512_BF16 inline void weighted_rows_columns(const uint16_t* rows, int64_t ld, const int64_t* keys,
                                                              const float* w, int64_t count, float* y,
                                                              __mmask16 last) {
  __m512 sums[kVectors];
  for (int v = 0; v < kVectors; ++v) sums[v] = _mm512_maskz_loadu_ps(v == kVectors - 1 ? last : 0xFFFF, y + 16 * v);
  for (int64_t c = 0; c < count; ++c) {
    const uint16_t* row = rows + keys[c] * ld;
    const __m512 factor = _mm512_set1_ps(w[c]);
    for (int v = 0; v < kVectors; ++v) {
      const __m256i packed = _mm256_maskz_loadu_epi16(v == kVectors - 1 ? last : 0xFFFF, row + 16 * v);
      const __m512 widened = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(packed), 16));
      sums[v] = _mm512_fmadd_ps(factor, widened, sums[v]);
    }
  }
  for (int v = 0; v < kVectors; ++v) _mm512_mask_storeu_ps(y + 16 * v, v == kVectors - 1 ? last : 0xFFFF, sums[v]);
}

// y (dim) += sum_c w[c] * row keys[c] of `rows` (bfloat16, row stride ld), in float32: blocks
// of 64 keys (64 rows of 1 KiB at dim 512 stay in L2 while their columns are summed) by 64
// columns in 4 registers.
FASTATTN_TARGET_AVX512_BF16 inline void weighted_rows(const uint16_t* rows, int64_t ld, const int64_t* keys,
                                                      const float* w, int64_t count, int64_t dim, float* y) {
  constexpr int64_t kKeyBlock = 64;
  for (int64_t first = 0; first < count; first += kKeyBlock) {
    const int64_t block = std::min(kKeyBlock, count - first);
    int64_t d = 0;
    for (; d + 64 <= dim; d += 64) weighted_rows_columns<4>(rows + d, ld, keys + first, w + first, block, y + d, 0xFFFF);
    for (; d < dim; d += 16) {
      const __mmask16 last = dim - d >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (dim - d)) - 1);
      weighted_rows_columns<1>(rows + d, ld, keys + first, w + first, block, y + d, last);
    }
  }
}

}  // namespace bfloat16_gemm
#endif

// c (batch, M, N) float32 = a (batch, M, K) b (batch, N, K)^T, a and b bfloat16 with unit
// stride along K (b's batch stride may be 0), c with unit stride along N (its rows may be
// columns of a wider buffer: a layer's input projection writes into the gate columns of
// its saved rows).  Only where bfloat16_matmul_nt_available().
inline void bfloat16_matmul_nt_out(at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  // (an empty operand's strides are arbitrary: a layer's input of batch 0 after another layer)
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 && a.dim() == 3 && b.dim() == 3 &&
                  a.size(0) == b.size(0) && a.size(2) == b.size(2) && (a.stride(2) == 1 || a.numel() == 0) &&
                  (b.stride(2) == 1 || b.numel() == 0),
              "bfloat16_matmul_nt: needs bfloat16 (n, M, K) and (n, N, K) with unit stride along K, got ",
              a.scalar_type(), " ", a.sizes(), " and ", b.scalar_type(), " ", b.sizes());
  TORCH_CHECK(c.scalar_type() == at::kFloat && c.dim() == 3 && c.size(0) == a.size(0) && c.size(1) == a.size(1) &&
                  c.size(2) == b.size(1) && (c.stride(2) == 1 || c.size(2) <= 1 || c.numel() == 0),
              "bfloat16_matmul_nt: needs a float32 (n, M, N) output with unit stride along N, got ", c.scalar_type(),
              " ", c.sizes(), " strides ", c.strides());
  TORCH_CHECK(bfloat16_matmul_nt_available(), "bfloat16_matmul_nt: this CPU has no AVX512-BF16");
  if (c.numel() == 0) return;
  if (a.size(2) == 0) {
    c.zero_();
    return;
  }
#ifdef FASTATTN_AVX512_BF16_CLONES
  // b shared by the batch (stride 0) and a's and c's batches one after another: one GEMM
  // over all of a's rows (b packed once a thread, the row blocks full where each batch has
  // few rows).
  const bool one_gemm = a.size(0) > 1 && b.stride(0) == 0 && a.stride(0) == a.size(1) * a.stride(1) &&
                        c.stride(0) == c.size(1) * c.stride(1);
  const int64_t batch = one_gemm ? 1 : a.size(0), M = one_gemm ? a.size(0) * a.size(1) : a.size(1);
  const int64_t K = a.size(2), N = b.size(1);
  const auto* a_data = reinterpret_cast<const uint16_t*>(a.const_data_ptr<at::BFloat16>());
  const auto* b_data = reinterpret_cast<const uint16_t*>(b.const_data_ptr<at::BFloat16>());
  float* c_data = c.mutable_data_ptr<float>();
  const int64_t lda = a.stride(1), ldb = b.stride(1), ldc = c.stride(1);
  const int64_t a_batch = a.stride(0), b_batch = b.stride(0), c_batch = c.stride(0);
  // Tasks of whole row blocks, at least two a thread when the batch alone has fewer.
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::min((2 * threads + batch - 1) / batch, (M + bfloat16_gemm::kRowBlock - 1) / bfloat16_gemm::kRowBlock);
  const int64_t chunk_blocks = ((M + bfloat16_gemm::kRowBlock - 1) / bfloat16_gemm::kRowBlock + splits - 1) / splits;
  const int64_t chunk = chunk_blocks * bfloat16_gemm::kRowBlock, chunks = (M + chunk - 1) / chunk;
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> packed(bfloat16_gemm::panels_of(N) * bfloat16_gemm::panel_elements(K));
    const uint16_t* packed_from = nullptr;  // the B the buffer holds: packed once for a range's tasks of it
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, first = (task % chunks) * chunk, rows = std::min(chunk, M - first);
      const uint16_t* b_rows = b_data + n * b_batch;
      if (b_rows != packed_from) {
        bfloat16_gemm::pack(b_rows, N, K, ldb, packed.data());
        packed_from = b_rows;
      }
      bfloat16_gemm::gemm(a_data + n * a_batch + first * lda, rows, lda, K, packed.data(), N,
                          c_data + n * c_batch + first * ldc, ldc);
    }
  });
#endif
}

// a (batch, M, K) and b (batch, N, K), bfloat16 with unit stride along K (b's batch stride
// may be 0) -> (batch, M, N) float32.  Only where bfloat16_matmul_nt_available().
inline at::Tensor bfloat16_matmul_nt(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3, "bfloat16_matmul_nt: needs (n, M, K) and (n, N, K), got shapes ", a.sizes(),
              " and ", b.sizes());
  at::Tensor c = at::empty({a.size(0), a.size(1), b.size(1)}, a.options().dtype(at::kFloat));
  bfloat16_matmul_nt_out(c, a, b);
  return c;
}

// weights (N, 1, S) float32 and values (N, S, Dv) bfloat16 with contiguous rows (batch
// stride free) -> context (N, 1, Dv) float32 = W v: a decode step's one query row a batch
// element, the values read once as stored and widened in registers, keys of weight 0
// (masked) skipped, W not rounded.  A whole decode step (location score, N = 64, S = 1024,
// D = Dv = 512, two cores) took 4.8 ms with at::bmm's matrix-vector products on W rounded
// to bfloat16 (whose reads of the values ran at about 15 GB/s), 3.2 ms with this.  Only
// where bfloat16_matmul_nt_available().
inline at::Tensor bfloat16_decode_context(const at::Tensor& weights, const at::Tensor& values) {
  TORCH_CHECK(weights.scalar_type() == at::kFloat && values.scalar_type() == at::kBFloat16 && weights.dim() == 3 &&
                  values.dim() == 3 && weights.size(1) == 1 && weights.size(0) == values.size(0) &&
                  weights.size(2) == values.size(1) && weights.is_contiguous() && values.stride(2) == 1 &&
                  (values.size(1) <= 1 || values.stride(1) == values.size(2)),
              "bfloat16_decode_context: needs contiguous float32 (N, 1, S) weights and bfloat16 (N, S, Dv) values "
              "with contiguous rows, got ", weights.scalar_type(), " ", weights.sizes(), " and ", values.scalar_type(),
              " ", values.sizes());
  TORCH_CHECK(bfloat16_matmul_nt_available(), "bfloat16_decode_context: this CPU has no AVX512-BF16");
  const int64_t batch = values.size(0), source_length = values.size(1), value_dim = values.size(2);
  at::Tensor context = at::zeros({batch, 1, value_dim}, weights.options());
#ifdef FASTATTN_AVX512_BF16_CLONES
  const float* weights_data = weights.const_data_ptr<float>();
  const auto* values_data = reinterpret_cast<const uint16_t*>(values.const_data_ptr<at::BFloat16>());
  float* context_data = context.mutable_data_ptr<float>();
  const int64_t values_batch = values.stride(0);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> keys(source_length);
    std::vector<float> key_weights(source_length);
    for (int64_t n = begin; n < end; ++n) {
      const float* row = weights_data + n * source_length;
      int64_t count = 0;
      for (int64_t j = 0; j < source_length; ++j) {
        if (row[j] != 0.0f) {  // NaN too: a NaN row stays NaN
          keys[count] = j;
          key_weights[count++] = row[j];
        }
      }
      bfloat16_gemm::weighted_rows(values_data + n * values_batch, value_dim, keys.data(), key_weights.data(), count,
                                   value_dim, context_data + n * value_dim);
    }
  });
#endif
  return context;
}

}  // namespace fastattn
