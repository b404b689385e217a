// One GEMM h (M, K) @ b (K, N) split over ATen's threads by columns, in the ways a float32
// tile can run (tile_engines.py builds this with torch.utils.cpp_extension and times it):
//   0 brgemm:        at::native::cpublas::brgemm per block of `block` columns, b row-major
//                    (rows N + 16 floats apart), K in blocks of `depth` added up in C;
//   1 brgemm packed: the same on b packed block by block ((K, block) contiguous);
//   2 sgemm:         the BLAS's sgemm_ per block of columns (row-major as column-major);
//   3 sgemm thread:  one sgemm_ per thread over all its columns;
//   4 at::mm_out:    at::mm_out on from_blob views per block of columns.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <chrono>

extern "C" void sgemm_(char*, char*, int*, int*, int*, float*, const float*, int*, const float*, int*, float*,
                       float*, int*);

namespace {

void sgemm_row_major(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                     float* C, int64_t ldc) {
  char no = 'N';
  int m = N, n = M, k = K, b_ld = ldb, a_ld = lda, c_ld = ldc;
  float one = 1.0f, zero = 0.0f;
  sgemm_(&no, &no, &m, &n, &k, &one, B, &b_ld, A, &a_ld, &zero, C, &c_ld);
}

// Seconds per GEMM over `repeats`.
double time_gemm(at::Tensor h, at::Tensor b, at::Tensor packed, at::Tensor c, int64_t way, int64_t depth,
                 int64_t block, int64_t repeats) {
  const int64_t M = h.size(0), K = h.size(1), N = c.size(1), ldb = b.stride(0);
  const float* A = h.data_ptr<float>();
  const float* B = b.data_ptr<float>();
  const float* P = packed.data_ptr<float>();
  float* C = c.data_ptr<float>();
  const auto start = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < repeats; ++r) {
    at::parallel_for(0, N / block, 1, [&](int64_t begin, int64_t end) {
      if (way == 3) {
        sgemm_row_major(M, (end - begin) * block, K, A, K, B + begin * block, ldb, C + begin * block, N);
        return;
      }
      for (int64_t index = begin; index < end; ++index) {
        const int64_t n0 = index * block;
        if (way == 0 || way == 1) {
          const float* panel = way == 0 ? B + n0 : P + index * K * block;
          const int64_t ld = way == 0 ? ldb : block;
          for (int64_t k0 = 0; k0 < K; k0 += depth) {
            at::native::cpublas::brgemm(M, block, std::min(depth, K - k0), K, ld, N, k0 > 0, A + k0, panel + k0 * ld,
                                        C + n0, false);
          }
        } else if (way == 2) {
          sgemm_row_major(M, block, K, A, K, B + n0, ldb, C + n0, N);
        } else {
          const at::AutoDispatchBelowADInplaceOrView below_autograd;
          const at::Tensor a = at::from_blob(const_cast<float*>(A), {M, K}, {K, 1}, at::kFloat);
          const at::Tensor bb = at::from_blob(const_cast<float*>(B + n0), {K, block}, {ldb, 1}, at::kFloat);
          at::Tensor cc = at::from_blob(C + n0, {M, block}, {N, 1}, at::kFloat);
          at::mm_out(cc, a, bb);
        }
      }
    });
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  at::native::cpublas::brgemm_release();
  return seconds / repeats;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("time_gemm", &time_gemm); }
