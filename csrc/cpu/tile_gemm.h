// tile_matmul: C = A @ B for one tile, on the calling thread, for kernels that split a
// GEMM over their own threads and fuse work around each tile (the recurrent step of the
// LSTM/GRU layers: each thread multiplies the state by its own gate columns and applies
// the gate maths to them, one parallel region per time step).
//   float:  one of two engines (TileEngine):
//           - brgemm: ATen's batch-reduce GEMM micro-kernel (at::native::cpublas::brgemm,
//             oneDNN's JIT ukernel).  Measured on the 2-core AMD EPYC of this project at
//             M=32, K=256, N=1024: 101 GFLOP/s per core against 85 for at::mm (MKL), and it
//             scales to 2 threads when split by columns.  The ukernel does not block K
//             itself: a long K runs as blocks of kTileDepth, each added to C (one core at
//             M=64, N=512, K=4096: 24 GFLOP/s in one call, 98-103 in blocks of 256 or 512;
//             at K <= 1024 one call or blocks run alike).  The attention's tiles take it.
//           - blas: the BLAS's sgemm, called directly (at::mm_out on views of each tile ran
//             95-119 GFLOP/s against sgemm's 139-181 on a 2-core Intel Xeon at M=32, K=64,
//             N=64: benchmarks/results/2026-12-06-cpu-2core-intel-layer-gemms/).  The
//             LSTM/GRU layers take it where layer_tile_engine says.  The attention's tiles
//             (K = D, N <= 256) stay on brgemm: on that Xeon the multi-query forward at
//             B=32, T=S=64, D=256 took 759-790 us on them, 816-864 on sgemm's (measured
//             with a build that let the attention's tiles take sgemm; not kept).
//           Torch versions without the float brgemm take sgemm; without a BLAS, at::mm_out.
//   double: at::mm_out on views of the tile (BLAS; single-threaded inside a parallel region).
// Row-major, leading dimensions in elements; nothing is accumulated (C is overwritten).
// as_tile_operand: a matrix laid out for the B operand of float32 tiles.
// matmul_into: a whole GEMM as brgemm tiles in parallel (float32; otherwise at::mm_out).
// matmul_transposed_into: x @ w^T for a few rows, split over the rows of w (float32 on
//   AVX-512 and AVX2: few_rows_matmul_into's kernels).
// small_matmul_into: a @ b for a small product, on the calling thread (a cell's backward).
// batched_matmul_into: out = a (batch, M, K) @ b (batch, K, N), each matrix row- or
//   column-major, as float32 tiles over ATen's threads (the attention's matrix-multiply path).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#include "isa.h"

#ifdef FASTATTN_AVX2_CLONES
#include <immintrin.h>
#endif

#if AT_BUILD_WITH_BLAS() && !AT_BLAS_F2C()
// The BLAS's single-precision GEMM (column-major), declared as ATen's CPUBlas.cpp declares it;
// libtorch_cpu exports it.
extern "C" void sgemm_(char* transa, char* transb, int* m, int* n, int* k, float* alpha, const float* a, int* lda,
                       const float* b, int* ldb, float* beta, float* c, int* ldc);
#define FASTATTN_SGEMM 1
#endif

namespace fastattn {

enum class TileEngine { kBrgemm, kBlas };

// The engine of the float tiles and input projection of an LSTM/GRU layer of this batch
// and hidden size (layer_gemm_setting, csrc/cpu/isa.h).  kBlasForLargeSteps takes the BLAS
// for batch >= 48 and hidden >= 512, measured on a 2-core Intel Xeon with AVX-512
// (benchmarks/results/2026-12-06-cpu-2core-intel-layer-gemms/): sgemm tiles ran 253-305
// GFLOP/s over both threads at M=64, K=1024, N=512 a tile against 139-164 for brgemm's, and
// at T=100, B=64, H=1024 an LSTM layer's forward took 357-370 ms on sgemm against 370-414
// on brgemm (forward and backward 968-1030 against 1070-1130; a GRU's 251-264 against
// 310-336 and 784-852 against 921-946).  At B=32, H=256 sgemm tiles of M=32, K=256, N=128
// ran 193-198 against brgemm's 170-175, yet the layers ran faster on brgemm (LSTM forward
// 11.7-13.9 against 12.9-16 ms, GRU 9.05-10.2 against 10.3-10.5).  Sizes between were not
// measured.
inline TileEngine layer_tile_engine(int64_t batch, int64_t hidden) {
  switch (layer_gemm_setting()) {
    case LayerGemm::kBlas:
      return TileEngine::kBlas;
    case LayerGemm::kBlasForLargeSteps:
      return batch >= 48 && hidden >= 512 ? TileEngine::kBlas : TileEngine::kBrgemm;
    case LayerGemm::kBrgemm:
      break;
  }
  return TileEngine::kBrgemm;
}

// The BLAS form of a tile: at::mm_out on views of it (single-threaded inside a parallel
// region).
template <typename T>
inline void tile_matmul_blas(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                             int64_t ldb, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // may run on a worker thread
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, options);
  const at::Tensor b = at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, options);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, options);
  at::mm_out(c, a, b);
}

// The sgemm form of a float tile: row-major C = A B as column-major C^T = B^T A^T.  False
// (nothing done) without a BLAS or where a size or leading dimension exceeds int or is
// below what sgemm accepts.
inline bool tile_matmul_sgemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                              int64_t ldb, float* C, int64_t ldc) {
#ifdef FASTATTN_SGEMM
  if (std::max({M, N, K, lda, ldb, ldc}) > INT_MAX || lda < std::max<int64_t>(1, K) ||
      ldb < std::max<int64_t>(1, N) || ldc < std::max<int64_t>(1, N)) {
    return false;
  }
  char no_transpose = 'N';
  int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  int b_ld = static_cast<int>(ldb), a_ld = static_cast<int>(lda), c_ld = static_cast<int>(ldc);
  float one = 1.0f, zero = 0.0f;
  sgemm_(&no_transpose, &no_transpose, &m, &n, &k, &one, B, &b_ld, A, &a_ld, &zero, C, &c_ld);
  return true;
#else
  return false;
#endif
}

// Whether a float tile of this engine runs on brgemm (the torch has the float brgemm).
inline bool on_brgemm(TileEngine engine) {
#ifdef CPUBLAS_BRGEMM_F32F32F32  // torch versions whose CPUBlas.h has the float brgemm
  return engine == TileEngine::kBrgemm;
#else
  (void)engine;
  return false;
#endif
}

inline void tile_matmul(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                        float* C, int64_t ldc, TileEngine engine = TileEngine::kBrgemm) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.0f);
    return;
  }
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (on_brgemm(engine)) {
    constexpr int64_t kTileDepth = 256;
    for (int64_t k0 = 0; k0 < K; k0 += kTileDepth) {
      at::native::cpublas::brgemm(M, N, std::min(kTileDepth, K - k0), lda, ldb, ldc, /*add_C=*/k0 > 0, A + k0,
                                  B + k0 * ldb, C, /*is_vnni=*/false);
    }
    return;
  }
#endif
  if (!tile_matmul_sgemm(M, N, K, A, lda, B, ldb, C, ldc)) tile_matmul_blas(M, N, K, A, lda, B, ldb, C, ldc);
}

inline void tile_matmul(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
                        int64_t ldb, double* C, int64_t ldc, TileEngine /*engine: BLAS always*/ = TileEngine::kBlas) {
  tile_matmul_blas(M, N, K, A, lda, B, ldb, C, ldc);
}

constexpr int64_t kAliasingBytes = 4096, kPadBytes = 64;

// The row stride, in floats, of a copy of rows `columns` floats long: padded by 64 bytes
// where the rows would lie a multiple of 4 KiB apart (see as_tile_operand).
inline int64_t tile_row_stride(int64_t columns) {
  const bool aliasing = (columns * static_cast<int64_t>(sizeof(float))) % kAliasingBytes == 0;
  return columns + (aliasing ? kPadBytes / static_cast<int64_t>(sizeof(float)) : 0);
}

// out (rows, N) = a (rows, K) @ w (N, K)^T in float32 for 1 to kFewRowsMaxRows rows, the rows of
// a, w and out contiguous, on AVX-512 or AVX2: the cells' and a decoder step's
// projections at a few rows, where ATen's GEMM call (the dispatcher, and a BLAS that splits
// even a 4 x 128 x 64 product over its threads) costs more than the arithmetic.  Four rows
// of w at a time stream past every row of a, their dot products accumulated in 16- (8-)
// lane vectors over K (the last K % 16 (8) under a mask) and the four reduced together to
// one 128-bit vector of outputs; the two ISAs' functions differ in their intrinsics only.
// Measured alone on this project's 2-core AMD EPYC (Zen 4) at 4 rows, N = 128: 0.87 us at
// K = 64 and 0.56 at K = 32 on AVX-512, 1.26 and 1.21 on AVX2, where one-lane-per-output
// reductions compiled from plain loops took 3.5-5 us, sgemm on one thread 1.4 and
// at::mm_out about 4.9.  Other CPUs, dtypes and layouts take at::mm_out.
constexpr int64_t kFewRowsMaxRows = 4;

#ifdef FASTATTN_AVX2_CLONES
// The first `count` (< 8) floats at p, zeros after.
FASTATTN_TARGET_AVX2 inline __m256 load_first_avx2(const float* p, int64_t count) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lanes));
}

// The sum of each of four 8-lane vectors, as the four lanes of one vector.
FASTATTN_TARGET_AVX2 inline __m128 four_sums_avx2(const __m256 (&vectors)[4]) {
  const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(vectors[0], vectors[1]), _mm256_hadd_ps(vectors[2], vectors[3]));
  return _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1));
}

// sums[r][j] += a[r][k:k+count] . w[n0 + j][k:k+count], count <= 8.
template <int kRows, int kColumns>
FASTATTN_TARGET_AVX2 inline void few_rows_accumulate_avx2(const float* a, int64_t a_stride, const float* w,
                                                          int64_t w_stride, int64_t n0, int64_t k, int64_t count,
                                                          __m256 (&sums)[kRows][4]) {
  auto load = [count](const float* p) FASTATTN_TARGET_AVX2 {
    return count == 8 ? _mm256_loadu_ps(p) : load_first_avx2(p, count);
  };
  __m256 w_lanes[kColumns];
  for (int j = 0; j < kColumns; ++j) w_lanes[j] = load(w + (n0 + j) * w_stride + k);
  for (int r = 0; r < kRows; ++r) {
    const __m256 a_lanes = load(a + r * a_stride + k);
    for (int j = 0; j < kColumns; ++j) sums[r][j] = _mm256_fmadd_ps(a_lanes, w_lanes[j], sums[r][j]);
  }
}

// out[r][n0 + j] for every row r < kRows and j < kColumns (4, or 1 for the last N % 4).
template <int kRows, int kColumns>
FASTATTN_TARGET_AVX2 inline void few_rows_block_avx2(const float* a, int64_t a_stride, const float* w,
                                                     int64_t w_stride, float* out, int64_t out_stride, int64_t n0,
                                                     int64_t K) {
  const int64_t full = K / 8 * 8;
  __m256 sums[kRows][4];
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < 4; ++j) sums[r][j] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < full; k += 8) few_rows_accumulate_avx2<kRows, kColumns>(a, a_stride, w, w_stride, n0, k, 8, sums);
  if (K > full) few_rows_accumulate_avx2<kRows, kColumns>(a, a_stride, w, w_stride, n0, full, K - full, sums);
  for (int r = 0; r < kRows; ++r) {
    const __m128 outputs = four_sums_avx2(sums[r]);
    if constexpr (kColumns == 4) {
      _mm_storeu_ps(out + r * out_stride + n0, outputs);
    } else {
      out[r * out_stride + n0] = _mm_cvtss_f32(outputs);
    }
  }
}

template <int kRows>
FASTATTN_TARGET_AVX2 void few_rows_matmul_avx2(const float* a, int64_t a_stride, const float* w, int64_t w_stride,
                                               float* out, int64_t out_stride, int64_t N, int64_t K) {
  int64_t n = 0;
  for (; n + 4 <= N; n += 4) few_rows_block_avx2<kRows, 4>(a, a_stride, w, w_stride, out, out_stride, n, K);
  for (; n < N; ++n) few_rows_block_avx2<kRows, 1>(a, a_stride, w, w_stride, out, out_stride, n, K);
}
#endif

#ifdef FASTATTN_AVX512_CLONES
// The sum of each of four 16-lane vectors, as the four lanes of one vector.
FASTATTN_TARGET_AVX512 inline __m128 four_sums(const __m512 (&vectors)[4]) {
  __m128 quarters[4];
  for (int j = 0; j < 4; ++j) {
    const __m256 halves = _mm256_add_ps(_mm512_castps512_ps256(vectors[j]),
                                        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(vectors[j]), 1)));
    quarters[j] = _mm_add_ps(_mm256_castps256_ps128(halves), _mm256_extractf128_ps(halves, 1));
  }
  return _mm_hadd_ps(_mm_hadd_ps(quarters[0], quarters[1]), _mm_hadd_ps(quarters[2], quarters[3]));
}

// sums[r][j] += a[r][k:k+16] . w[n0 + j][k:k+16] over the lanes in `lanes`.
template <int kRows, int kColumns>
FASTATTN_TARGET_AVX512 inline void few_rows_accumulate_avx512(const float* a, int64_t a_stride, const float* w,
                                                              int64_t w_stride, int64_t n0, int64_t k,
                                                              __mmask16 lanes, __m512 (&sums)[kRows][4]) {
  __m512 w_lanes[kColumns];
  for (int j = 0; j < kColumns; ++j) w_lanes[j] = _mm512_maskz_loadu_ps(lanes, w + (n0 + j) * w_stride + k);
  for (int r = 0; r < kRows; ++r) {
    const __m512 a_lanes = _mm512_maskz_loadu_ps(lanes, a + r * a_stride + k);
    for (int j = 0; j < kColumns; ++j) sums[r][j] = _mm512_fmadd_ps(a_lanes, w_lanes[j], sums[r][j]);
  }
}

// out[r][n0 + j] for every row r < kRows and j < kColumns (4, or 1 for the last N % 4).
template <int kRows, int kColumns>
FASTATTN_TARGET_AVX512 inline void few_rows_block_avx512(const float* a, int64_t a_stride, const float* w,
                                                         int64_t w_stride, float* out, int64_t out_stride,
                                                         int64_t n0, int64_t K) {
  const int64_t full = K / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - full)) - 1u);
  __m512 sums[kRows][4];
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < 4; ++j) sums[r][j] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < full; k += 16) {
    few_rows_accumulate_avx512<kRows, kColumns>(a, a_stride, w, w_stride, n0, k, static_cast<__mmask16>(0xFFFF), sums);
  }
  if (tail != 0) few_rows_accumulate_avx512<kRows, kColumns>(a, a_stride, w, w_stride, n0, full, tail, sums);
  for (int r = 0; r < kRows; ++r) {
    const __m128 outputs = four_sums(sums[r]);
    if constexpr (kColumns == 4) {
      _mm_storeu_ps(out + r * out_stride + n0, outputs);
    } else {
      out[r * out_stride + n0] = _mm_cvtss_f32(outputs);
    }
  }
}

template <int kRows>
FASTATTN_TARGET_AVX512 void few_rows_matmul_avx512(const float* a, int64_t a_stride, const float* w, int64_t w_stride,
                                                   float* out, int64_t out_stride, int64_t N, int64_t K) {
  int64_t n = 0;
  for (; n + 4 <= N; n += 4) few_rows_block_avx512<kRows, 4>(a, a_stride, w, w_stride, out, out_stride, n, K);
  for (; n < N; ++n) few_rows_block_avx512<kRows, 1>(a, a_stride, w, w_stride, out, out_stride, n, K);
}
#endif

// Whether out = a @ w[begin:end]^T ran on the few-rows kernel (false: nothing was done).
inline bool few_rows_matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& w, int64_t begin,
                                 int64_t end) {
#ifdef FASTATTN_AVX512_CLONES
  const int64_t rows = a.size(0);
  if (!use_avx2_kernels() || rows < 1 || rows > kFewRowsMaxRows || a.scalar_type() != at::kFloat ||
      w.scalar_type() != at::kFloat || out.scalar_type() != at::kFloat || a.stride(1) != 1 || w.stride(1) != 1 ||
      out.stride(1) != 1) {
    return false;
  }
  using Kernel = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, int64_t);
  static constexpr Kernel kAvx512[] = {&few_rows_matmul_avx512<1>, &few_rows_matmul_avx512<2>,
                                       &few_rows_matmul_avx512<3>, &few_rows_matmul_avx512<4>};
  static constexpr Kernel kAvx2[] = {&few_rows_matmul_avx2<1>, &few_rows_matmul_avx2<2>, &few_rows_matmul_avx2<3>,
                                     &few_rows_matmul_avx2<4>};
  const Kernel kernel = (use_avx512_kernels() ? kAvx512 : kAvx2)[rows - 1];
  kernel(a.data_ptr<float>(), a.stride(0), w.data_ptr<float>() + begin * w.stride(0), w.stride(0),
         out.data_ptr<float>() + begin, out.stride(0), end - begin, a.size(1));
  return true;
#else
  (void)out, (void)a, (void)w, (void)begin, (void)end;
  return false;
#endif
}

// out (M, N) = a (M, K) @ b (K, N), or out += a @ b, in float32 or float64 for a product
// of at most kSmallMatmulProduct multiply-adds, on the calling thread: the GEMMs of a
// cell's backward at a few rows (its input and state gradients, rows x 4H by 4H x I, and
// its weight gradients, 4H x rows by rows x I), where ATen's GEMM call costs more than the
// arithmetic (9.1 us a call on average in an LSTM cell's backward at B = 4, H = 32).  a may
// have any strides (the gate gradients, or their transpose); the rows of b and out are
// contiguous.  Each row of out adds up K rows of b, each scaled by an element of a: loops
// the compiler vectorises over N (no sums across lanes), for each ISA (IsaClones).
constexpr int64_t kSmallMatmulProduct = int64_t{1} << 18;

template <typename scalar_t>
struct SmallMatmul {
  FASTATTN_KERNEL static void run(const scalar_t* a, int64_t a_row_stride, int64_t a_column_stride,
                                  const scalar_t* b, int64_t b_stride, scalar_t* out, int64_t out_stride,
                                  int64_t M, int64_t N, int64_t K, bool accumulate) {
    for (int64_t m = 0; m < M; ++m) {
      scalar_t* __restrict out_row = out + m * out_stride;
      if (!accumulate) std::fill(out_row, out_row + N, scalar_t(0));
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t factor = a[m * a_row_stride + k * a_column_stride];
        const scalar_t* __restrict b_row = b + k * b_stride;
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) out_row[n] += factor * b_row[n];
      }
    }
  }
};

// Whether out (+)= a @ b ran on SmallMatmul (false: nothing was done).
inline bool small_matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const auto type = out.scalar_type();
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if ((type != at::kFloat && type != at::kDouble) || a.scalar_type() != type || b.scalar_type() != type ||
      M * N * K > kSmallMatmulProduct || b.stride(1) != 1 || out.stride(1) != 1 || out.size(0) != M ||
      out.size(1) != N || b.size(0) != K) {
    return false;
  }
  AT_DISPATCH_FLOATING_TYPES(type, "small_matmul_into", [&] {
    static const auto kernel = IsaClones<&SmallMatmul<scalar_t>::run>::for_this_cpu();
    kernel(a.const_data_ptr<scalar_t>(), a.stride(0), a.stride(1), b.const_data_ptr<scalar_t>(), b.stride(0),
           out.mutable_data_ptr<scalar_t>(), out.stride(0), M, N, K, accumulate);
  });
  return true;
}

// out (M, N) = a (M, K) @ w (N, K)^T.  For a few rows (a decoder step at batch 1) BLAS
// runs one single-threaded GEMV; the rows of w are then split over ATen's threads, one
// GEMV each (measured here at M=1, K=512, N=1024: 43 us for at::mm, 23 us split over 2
// threads).  Otherwise one at::mm_out, and for a few rows of a small w too (N K <= 2^17
// and M N K <= 2^18), where waking the second thread costs more than it saves.  On this
// project's 2-core Intel Xeon (benchmarks/results/2026-12-07-cpu-2core-intel-cell-gemv/):
// fastattn bench --quick (B=4, H=32), against torch.nn's cells in the same runs, from
// 0.61-0.79x to 0.84-0.97x for lstm_cell.forward and from 0.60-0.73x to 0.97-1.15x for
// gru_cell.forward; the bare LSTM cell op in a tight loop, one thread against two: B=1 H=176
// (N K = 123,904) 32.3 us against 34.1, H=192 44.9 against 28.9, H=256 107 against 56; B=4
// H=128 28.5 against 33.1.  At B=4 H=160 (M N K = 409,600) the tight loop favoured one
// GEMV and fastattn.nn.LSTMCell called in a loop the split (98.9 us against 86.8).
// The GEMVs run few_rows_matmul_into where it applies.
inline void matmul_transposed_into(at::Tensor out, const at::Tensor& a, const at::Tensor& w) {
  constexpr int64_t kWeightRowsPerTask = 64;
  constexpr int64_t kSmallWeight = int64_t{1} << 17, kSmallProduct = int64_t{1} << 18;
  const int64_t weight = w.size(0) * w.size(1);
  if (a.size(0) > kFewRowsMaxRows || at::get_num_threads() == 1 || at::in_parallel_region() ||
      (weight <= kSmallWeight && a.size(0) * weight <= kSmallProduct)) {
    if (!few_rows_matmul_into(out, a, w, 0, w.size(0))) at::mm_out(out, a, w.t());
    return;
  }
  at::parallel_for(0, w.size(0), kWeightRowsPerTask, [&](int64_t begin, int64_t end) {
    if (few_rows_matmul_into(out, a, w, begin, end)) return;
    // Dispatch state is per thread: a worker thread would otherwise see the autograd
    // kernels (and refuse mm's out= on tensors that require grad).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor columns = out.narrow(1, begin, end - begin);
    at::mm_out(columns, a, w.narrow(0, begin, end - begin).t());
  });
}

// dst (rows, columns), row stride ld, from src's column-major (rows, columns): element
// (r, c) at src[r + c * src_stride].  In blocks of 8 x 8, eight AVX loads and stores
// each (vunpck / vshufps / vperm2f128) where the CPU has AVX2, one element at a time
// around them and elsewhere.  Measured on this project's 2-core AMD EPYC (32 key blocks
// of 64 x 256, two threads): 34 us in AVX2 blocks, 87 us in 8 x 8 blocks element by
// element, 231 us row by row.
inline void transpose_scalar(float* dst, int64_t ld, const float* src, int64_t src_stride, int64_t rows,
                             int64_t columns, int64_t row_begin) {
  constexpr int64_t kBlock = 8;
  for (int64_t c0 = 0; c0 < columns; c0 += kBlock) {
    for (int64_t r0 = row_begin; r0 < rows; r0 += kBlock) {
      const int64_t c_end = std::min(columns, c0 + kBlock), r_end = std::min(rows, r0 + kBlock);
      for (int64_t c = c0; c < c_end; ++c) {
        for (int64_t r = r0; r < r_end; ++r) dst[r * ld + c] = src[r + c * src_stride];
      }
    }
  }
}

#ifdef FASTATTN_AVX2_CLONES
FASTATTN_TARGET_AVX2 inline void transpose_avx2(float* dst, int64_t ld, const float* src, int64_t src_stride,
                                                int64_t rows, int64_t columns) {
  const int64_t full_rows = rows / 8 * 8, full_columns = columns / 8 * 8;
  for (int64_t r0 = 0; r0 < full_rows; r0 += 8) {
    for (int64_t c0 = 0; c0 < full_columns; c0 += 8) {
      const float* s = src + r0 + c0 * src_stride;
      __m256 in[8], pairs[8], quads[8];
      for (int i = 0; i < 8; ++i) in[i] = _mm256_loadu_ps(s + i * src_stride);
      for (int i = 0; i < 8; i += 2) {
        pairs[i] = _mm256_unpacklo_ps(in[i], in[i + 1]);
        pairs[i + 1] = _mm256_unpackhi_ps(in[i], in[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        quads[i] = _mm256_shuffle_ps(pairs[i], pairs[i + 2], 0x44);
        quads[i + 1] = _mm256_shuffle_ps(pairs[i], pairs[i + 2], 0xEE);
        quads[i + 2] = _mm256_shuffle_ps(pairs[i + 1], pairs[i + 3], 0x44);
        quads[i + 3] = _mm256_shuffle_ps(pairs[i + 1], pairs[i + 3], 0xEE);
      }
      float* d = dst + r0 * ld + c0;
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(d + i * ld, _mm256_permute2f128_ps(quads[i], quads[i + 4], 0x20));
        _mm256_storeu_ps(d + (i + 4) * ld, _mm256_permute2f128_ps(quads[i], quads[i + 4], 0x31));
      }
    }
    for (int64_t c = full_columns; c < columns; ++c) {
      for (int64_t r = r0; r < r0 + 8; ++r) dst[r * ld + c] = src[r + c * src_stride];
    }
  }
  transpose_scalar(dst, ld, src, src_stride, rows, columns, full_rows);
}
#endif

inline void transpose_into(float* dst, int64_t ld, const float* src, int64_t src_stride, int64_t rows,
                           int64_t columns) {
#ifdef FASTATTN_AVX2_CLONES
  if (use_avx2_kernels()) {
    transpose_avx2(dst, ld, src, src_stride, rows, columns);
    return;
  }
#endif
  transpose_scalar(dst, ld, src, src_stride, rows, columns, 0);
}

// b (K, N) as the B operand of tile_matmul: unit column stride and, in float32, rows not a
// multiple of 4 KiB apart (a copy with each row padded by 64 bytes where they would be).
// The float tile reads B down K a row at a time, and rows 4 KiB apart share the L1 cache's
// sets: measured on this project's 2-core AMD EPYC (Zen 4) at M=32, N=128, K=256, 78-81
// GFLOP/s per core with B's rows 4096 or 8192 bytes apart (an LSTM's w_hh^T at H=256 or
// 512, its w_ih^T likewise), 111-113 GFLOP/s 4160 bytes apart and at every other stride
// tried (512 to 6144 bytes).  A column-major b (a transposed view: an LSTM's w^T) is copied
// by transpose_into over ATen's threads: at::Tensor::copy_ took 272 us for a w_hh^T of
// 256 x 1024 on one core, a cost every layer call paid twice.  Other dtypes: b.contiguous().
inline at::Tensor as_tile_operand(const at::Tensor& b) {
  if (b.scalar_type() != at::kFloat) return b.contiguous();
  const int64_t rows = b.size(0), columns = b.size(1);
  const int64_t row_bytes = static_cast<int64_t>(sizeof(float)) * b.stride(0);
  if (b.stride(1) == 1 && b.stride(0) >= columns && row_bytes % kAliasingBytes != 0) return b;
  at::Tensor copy = at::empty({rows, tile_row_stride(columns)}, b.options());
  if (b.stride(0) != 1 || b.stride(1) < rows || rows <= 1) return copy.narrow(1, 0, columns).copy_(b);
  constexpr int64_t kRowsPerTask = 64;
  const float* source = b.const_data_ptr<float>();
  float* destination = copy.mutable_data_ptr<float>();
  const int64_t ld = copy.stride(0), source_stride = b.stride(1);
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    transpose_into(destination + begin * ld, ld, source + begin, source_stride, end - begin, columns);
  });
  return copy.narrow(1, 0, columns);
}

// out (M, N) = a (M, K) @ b (K, N), out any row stride: float32 on brgemm as tiles of
// 32 x 256 over ATen's threads, a with unit column stride and b laid out by as_tile_operand
// first (measured on the AMD EPYC: 190-210 GFLOP/s on 2 threads at the LSTM layer's shapes,
// against 150-175 for at::mm).  Otherwise (the blas engine, other dtypes or layouts) one
// at::mm_out on b as given, which blocks and threads the whole GEMM itself (330-380 GFLOP/s
// on the Intel Xeon at 6400 x 1024 x 4096, where brgemm tiles ran about 250).
inline void matmul_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b_given, TileEngine engine) {
  constexpr int64_t kTileRows = 32, kTileColumns = 256;
  const int64_t M = a.size(0), K = a.size(1), N = b_given.size(1);
  const bool tiles_apply = on_brgemm(engine) && a.scalar_type() == at::kFloat &&
                           b_given.scalar_type() == at::kFloat && a.stride(1) == 1 && out.stride(1) == 1 &&
                           a.stride(0) >= K && out.stride(0) >= N;
  if (!tiles_apply) {
    at::mm_out(out, a, b_given);
    return;
  }
  const at::Tensor b = as_tile_operand(b_given);
  const int64_t row_tiles = (M + kTileRows - 1) / kTileRows;
  const int64_t column_tiles = (N + kTileColumns - 1) / kTileColumns;
  const float* a_data = a.const_data_ptr<float>();
  const float* b_data = b.const_data_ptr<float>();
  float* out_data = out.mutable_data_ptr<float>();
  const int64_t lda = a.stride(0), ldb = b.stride(0), ldc = out.stride(0);
  at::parallel_for(0, row_tiles * column_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t m0 = (tile / column_tiles) * kTileRows, n0 = (tile % column_tiles) * kTileColumns;
      tile_matmul(std::min(kTileRows, M - m0), std::min(kTileColumns, N - n0), K, a_data + m0 * lda,
                  lda, b_data + n0, ldb, out_data + m0 * ldc + n0, ldc);
    }
  });
}

// The layout of the matrices of a batched operand t (batch, rows, columns).
inline bool row_major_matrices(const at::Tensor& t) {
  return t.stride(2) == 1 && (t.size(1) <= 1 || t.stride(1) >= t.size(2));
}
inline bool column_major_matrices(const at::Tensor& t) {
  return t.stride(1) == 1 && (t.size(2) <= 1 || t.stride(2) >= t.size(1));
}

// One matrix of a batched operand as tile_matmul reads it: its own rows where it is
// row-major (and, with pad_aliasing_rows, they are not a multiple of 4 KiB apart), else a
// row-major copy into `buffer`, its rows padded where they would be.
struct TileOperand {
  const float* data;
  int64_t ld;
};

inline TileOperand tile_operand_of(const float* matrix, bool row_major, int64_t row_stride, int64_t column_stride,
                                   int64_t rows, int64_t columns, bool pad_aliasing_rows, std::vector<float>& buffer) {
  if (row_major && rows == 1) return {matrix, columns};
  const bool aliasing = (row_stride * static_cast<int64_t>(sizeof(float))) % kAliasingBytes == 0;
  if (row_major && !(pad_aliasing_rows && aliasing)) return {matrix, row_stride};
  const int64_t ld = tile_row_stride(columns);
  buffer.resize(static_cast<size_t>(rows * ld));
  if (row_major) {
    for (int64_t r = 0; r < rows; ++r) {
      std::copy(matrix + r * row_stride, matrix + r * row_stride + columns, buffer.data() + r * ld);
    }
  } else {
    transpose_into(buffer.data(), ld, matrix, column_stride, rows, columns);
  }
  return {buffer.data(), ld};
}

// out (batch, M, N) = a (batch, M, K) @ b (batch, K, N), float32 with each matrix of a and
// of b row-major or column-major (a transposed view) and any batch strides, out contiguous
// (a block of rows of a larger tensor may be); other dtypes and layouts: at::bmm_out.  A task
// multiplies one batch element's rows by a panel of up to 256 of b's columns, the panel
// copied row-major first where b is column-major, in brgemm tiles of 32 rows (tile_matmul);
// tasks split the rows further only to give every thread work.
// Measured on this project's 2-core AMD EPYC at batch 32, M = N = 64, K = 256 (and M = 64,
// K = 64, N = 256): 305-315 us with both operands row-major, 312 us with a column-major a,
// 340 us with a column-major b, against 370-400 us for at::bmm (MKL) in each layout; at
// batch 16, T = 64, S = 256, D = 1024 (the backward's five shapes), 0.97-1.15x at::bmm's speed.
// The profiler sees the float32 tiles as fastattn::batched_matmul.
inline void batched_matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  constexpr int64_t kTileRows = 32, kTileColumns = 256;
  const bool a_row_major = row_major_matrices(a), b_row_major = row_major_matrices(b);
  if (a.scalar_type() != at::kFloat || b.scalar_type() != at::kFloat || out.scalar_type() != at::kFloat ||
      !out.is_contiguous() || !(a_row_major || column_major_matrices(a)) ||
      !(b_row_major || column_major_matrices(b))) {
    at::bmm_out(out, a, b);
    return;
  }
  RECORD_FUNCTION("fastattn::batched_matmul", std::vector<c10::IValue>({a, b}));
  const int64_t batch = a.size(0), M = a.size(1), K = a.size(2), N = b.size(2);
  TORCH_CHECK(out.size(0) == batch && out.size(1) == M && out.size(2) == N,
              "batched_matmul_into: out must be (", batch, ", ", M, ", ", N, "), got ", out.sizes());
  if (batch == 0 || M == 0 || N == 0) return;
  if (K == 0) {
    out.zero_();
    return;
  }
  const int64_t row_tiles = (M + kTileRows - 1) / kTileRows, column_tiles = (N + kTileColumns - 1) / kTileColumns;
  // Tasks per (element, panel): 1, or enough for 4 a thread when the elements are few.
  const int64_t wanted = 4 * at::get_num_threads(), panels = batch * column_tiles;
  const int64_t row_groups = std::min(row_tiles, std::max<int64_t>(1, (wanted + panels - 1) / panels));
  const int64_t tiles_per_group = (row_tiles + row_groups - 1) / row_groups;
  const float* a_data = a.const_data_ptr<float>();
  const float* b_data = b.const_data_ptr<float>();
  float* out_data = out.mutable_data_ptr<float>();
  at::parallel_for(0, panels * row_groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> a_buffer, b_buffer;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t element = task / (column_tiles * row_groups);
      const int64_t n0 = (task / row_groups % column_tiles) * kTileColumns, columns = std::min(kTileColumns, N - n0);
      const int64_t m0 = (task % row_groups) * tiles_per_group * kTileRows;
      const int64_t rows = std::min(M, m0 + tiles_per_group * kTileRows) - m0;
      if (rows <= 0) continue;
      const TileOperand lhs = tile_operand_of(a_data + element * a.stride(0) + m0 * a.stride(1), a_row_major, a.stride(1),
                                              a.stride(2), rows, K, /*pad_aliasing_rows=*/false, a_buffer);
      const TileOperand rhs = tile_operand_of(b_data + element * b.stride(0) + n0 * b.stride(2), b_row_major, b.stride(1),
                                              b.stride(2), K, columns, /*pad_aliasing_rows=*/true, b_buffer);
      float* c = out_data + element * M * N + m0 * N + n0;
      for (int64_t r = 0; r < rows; r += kTileRows) {
        tile_matmul(std::min(kTileRows, rows - r), columns, K, lhs.data + r * lhs.ld, lhs.ld, rhs.data, rhs.ld,
                    c + r * N, N);
      }
    }
  });
}

}  // namespace fastattn
