// additive_tanh.cuh: the tanh of the additive score's features on the GPU, shared by the
// attention kernels (attention_device.cuh) and the fused decoder step (decoder_step.cu).
#pragma once

#include "device_common.cuh"

namespace fastattn {
namespace cuda {

// tanh of additive feature d for element type T.  float16 / bfloat16 inputs split the
// features between the GPU's two pipes: feature d with d % kTanhSplit != kTanhSplit - 1
// takes tanh.approx.f32 on the special-function unit (one SFU op, relative error about
// 2^-11 (PTX ISA), the size of a 16-bit input's own rounding); the last of every
// kTanhSplit the project's rational tanh on the FMA units (tanh_of: no SFU op on the
// GPU, error 4e-7).  An SFU op costs a warp 8 cycles of its partition's SFU and one
// issue slot, the rational tanh about 21 issue slots: with the ~4 slots each feature
// needs anyway (convert, add, v-FMA, loads), 1 in 8 on the FMA units balances the two
// (a multi-query additive tile: ~14% above the SFU-only limit).  The choice depends on
// d alone, so that a forward and its backward's recomputation agree.  float32 takes
// tanh_of, float64 libm's; the CPU emulation (FASTATTN_CUDA_EMULATION) runs tanh_of
// for every feature.
constexpr int kTanhSplit = 8;

// Whether feature d of a kVec-wide pack at d0 (d = d0 + i, d0 a multiple of kVec) takes
// the FMA-unit tanh; compile-time when kVec is a multiple of kTanhSplit.
template <int kVec>
__device__ __forceinline__ bool on_fma_units(int64_t d0, int i) {
  if constexpr (kVec % kTanhSplit == 0) return i % kTanhSplit == kTanhSplit - 1;
  return (d0 + i) % kTanhSplit == kTanhSplit - 1;
}

template <typename T, int kVec>
__device__ __forceinline__ Acc<T> additive_tanh(Acc<T> x, int64_t d0, int i) {
#if !defined(FASTATTN_CUDA_EMULATION) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  if constexpr (sizeof(T) == 2) {
    if (on_fma_units<kVec>(d0, i)) return tanh_of(x);
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
  }
#endif
  return tanh_of(x);
}

}  // namespace cuda
}  // namespace fastattn
