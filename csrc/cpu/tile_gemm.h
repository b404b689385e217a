// tile_matmul: C = A @ B for one tile, on the calling thread, for kernels that split a
// GEMM over their own threads and fuse work around each tile (the recurrent step of the
// LSTM/GRU layers: each thread multiplies the state by its own gate columns and applies
// the gate maths to them, one parallel region per time step).
//   float:  ATen's batch-reduce GEMM micro-kernel (at::native::cpublas::brgemm, oneDNN's
//           JIT ukernel where the CPU has it, a BLAS call otherwise; torch versions
//           without the float brgemm get the double path).  Measured on the
//           2-core AMD EPYC of this project at M=32, K=256, N=1024: 101 GFLOP/s per core
//           against 85 for at::mm (MKL), and it scales to 2 threads when split by columns.
//           The ukernel does not block K itself: a long K runs as blocks of kTileDepth,
//           each added to C (one core at M=64, N=512, K=4096: 24 GFLOP/s in one call,
//           98-103 in blocks of 256 or 512; at K <= 1024 one call or blocks run alike).
//   double: at::mm_out on views of the tile (BLAS; single-threaded inside a parallel region).
// Row-major, leading dimensions in elements; nothing is accumulated (C is overwritten).
// as_tile_operand: a matrix laid out for the B operand of float32 tiles.
// matmul_into: a whole GEMM as such tiles in parallel (float32; other dtypes at::mm_out).
// matmul_transposed_into: x @ w^T for a few rows, split over the rows of w.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>

namespace fastattn {

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

inline void tile_matmul(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                        const float* B, int64_t ldb, float* C, int64_t ldc) {
#ifdef CPUBLAS_BRGEMM_F32F32F32  // torch versions whose CPUBlas.h has the float brgemm
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.0f);
    return;
  }
  constexpr int64_t kTileDepth = 256;
  for (int64_t k0 = 0; k0 < K; k0 += kTileDepth) {
    at::native::cpublas::brgemm(M, N, std::min(kTileDepth, K - k0), lda, ldb, ldc, /*add_C=*/k0 > 0, A + k0,
                                B + k0 * ldb, C, /*is_vnni=*/false);
  }
#else
  tile_matmul_blas(M, N, K, A, lda, B, ldb, C, ldc);
#endif
}

inline void tile_matmul(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                        const double* B, int64_t ldb, double* C, int64_t ldc) {
  tile_matmul_blas(M, N, K, A, lda, B, ldb, C, ldc);
}

// b (K, N) as the B operand of tile_matmul: unit column stride and, in float32, rows not a
// multiple of 4 KiB apart (a copy with each row padded by 64 bytes where they would be).
// The float tile reads B down K a row at a time, and rows 4 KiB apart share the L1 cache's
// sets: measured on this project's 2-core AMD EPYC (Zen 4) at M=32, N=128, K=256, 78-81
// GFLOP/s per core with B's rows 4096 or 8192 bytes apart (an LSTM's w_hh^T at H=256 or
// 512, its w_ih^T likewise), 111-113 GFLOP/s 4160 bytes apart and at every other stride
// tried (512 to 6144 bytes).  Other dtypes: b.contiguous().
inline at::Tensor as_tile_operand(const at::Tensor& b) {
  constexpr int64_t kAliasingBytes = 4096, kPadBytes = 64;
  if (b.scalar_type() != at::kFloat) return b.contiguous();
  const int64_t rows = b.size(0), columns = b.size(1);
  const int64_t row_bytes = static_cast<int64_t>(sizeof(float)) * b.stride(0);
  if (b.stride(1) == 1 && b.stride(0) >= columns && row_bytes % kAliasingBytes != 0) return b;
  const bool aliasing = (columns * static_cast<int64_t>(sizeof(float))) % kAliasingBytes == 0;
  const int64_t row_stride = columns + (aliasing ? kPadBytes / static_cast<int64_t>(sizeof(float)) : 0);
  return at::empty({rows, row_stride}, b.options()).narrow(1, 0, columns).copy_(b);
}

// out (M, N) = a (M, K) @ b (K, N), a and b with unit column stride, out any row stride:
// float32 as brgemm tiles of 32 x 256 over ATen's threads (measured here: 190-210
// GFLOP/s on 2 threads at the LSTM layer's shapes, against 150-175 for at::mm).
inline void matmul_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  constexpr int64_t kTileRows = 32, kTileColumns = 256;
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  const bool tiles_apply = a.scalar_type() == at::kFloat && a.stride(1) == 1 && b.stride(1) == 1 &&
                           out.stride(1) == 1 && a.stride(0) >= K && b.stride(0) >= N &&
                           out.stride(0) >= N;
  if (!tiles_apply) {
    at::mm_out(out, a, b);
    return;
  }
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

// out (M, N) = a (M, K) @ w (N, K)^T.  For a few rows (a decoder step at batch 1) BLAS
// runs one single-threaded GEMV; the rows of w are then split over ATen's threads, one
// GEMV each (measured here at M=1, K=512, N=1024: 43 us for at::mm, 23 us split over 2
// threads).  Otherwise one at::mm_out.
inline void matmul_transposed_into(at::Tensor out, const at::Tensor& a, const at::Tensor& w) {
  constexpr int64_t kFewRows = 4, kWeightRowsPerTask = 64;
  if (a.size(0) > kFewRows || at::get_num_threads() == 1 || at::in_parallel_region()) {
    at::mm_out(out, a, w.t());
    return;
  }
  at::parallel_for(0, w.size(0), kWeightRowsPerTask, [&](int64_t begin, int64_t end) {
    // Dispatch state is per thread: a worker thread would otherwise see the autograd
    // kernels (and refuse mm's out= on tensors that require grad).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor columns = out.narrow(1, begin, end - begin);
    at::mm_out(columns, a, w.narrow(0, begin, end - begin).t());
  });
}

}  // namespace fastattn
