// Run-time choice of the instruction set of the CPU kernels.  An extension meant for
// other machines is compiled without -march flags; its kernels are compiled three times
// instead, for the baseline ISA, with AVX2+FMA and with AVX-512 (F, BW, VL, DQ; target
// attributes), and the widest clone the CPU has is picked at run time.
// ATEN_CPU_CAPABILITY=default forces the baseline and =avx2 the AVX2 clones, as they do
// for ATen's own kernels.  The bfloat16 GEMM of the attention's matrix-multiply path
// (csrc/cpu/bfloat16_gemm.h) has one AVX-512 clone, run where the AVX-512 clones run and
// the CPU has AVX512-BF16 too.  The engine of the LSTM/GRU layers' float32 GEMMs (brgemm
// or the BLAS) is chosen here too.
#pragma once

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

// FASTATTN_KERNEL: the entry points of the kernels, flattened (every call inlined,
// fastattn::fast_tanh_with included) so that all their code gets the ISA of the clone.
#if defined(__GNUC__) || defined(__clang__)
#define FASTATTN_KERNEL __attribute__((flatten))
#else
#define FASTATTN_KERNEL
#endif

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define FASTATTN_AVX2_CLONES 1
#define FASTATTN_TARGET_AVX2 __attribute__((target("avx2,fma"), flatten))
#define FASTATTN_AVX512_CLONES 1
#define FASTATTN_TARGET_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq"), flatten))
#endif

// AVX512-BF16 (vdpbf16ps) needs GCC 10 or clang 9 and a 64-bit x86 target.
#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))
#define FASTATTN_AVX512_BF16_CLONES 1
#define FASTATTN_TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#include <cpuid.h>
#endif

namespace fastattn {

// Whether the AVX2 clones run: the CPU has AVX2 and FMA and ATEN_CPU_CAPABILITY is not
// "default".  Decided once per process.
inline bool use_avx2_kernels() {
#ifdef FASTATTN_AVX2_CLONES
  static const bool use = [] {
    const char* capability = std::getenv("ATEN_CPU_CAPABILITY");
    if (capability != nullptr && std::strcmp(capability, "default") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return use;
#else
  return false;
#endif
}

// Whether the AVX-512 clones run: the CPU has AVX-512 F, BW, VL and DQ, which
// __builtin_cpu_supports reports only where the OS saves the 512-bit registers, and
// ATEN_CPU_CAPABILITY is neither "default" nor "avx2".  Decided once per process.
inline bool use_avx512_kernels() {
#ifdef FASTATTN_AVX512_CLONES
  static const bool use = [] {
    const char* capability = std::getenv("ATEN_CPU_CAPABILITY");
    if (capability != nullptr && (std::strcmp(capability, "default") == 0 || std::strcmp(capability, "avx2") == 0)) {
      return false;
    }
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && use_avx2_kernels();
  }();
  return use;
#else
  return false;
#endif
}

// The clone of a kernel for this CPU: the AVX-512 one where use_avx512_kernels, else the
// AVX2 one where use_avx2_kernels, else the baseline.
template <typename Kernel>
Kernel kernel_for_this_cpu(Kernel baseline, Kernel avx2, Kernel avx512) {
  if (use_avx512_kernels()) return avx512;
  if (use_avx2_kernels()) return avx2;
  return baseline;
}

// IsaClones<&f>::for_this_cpu(): f itself, or f compiled again with AVX2+FMA or AVX-512
// (a flattened wrapper: f and everything it calls inlined into it, so compiled for that
// ISA), whichever kernel_for_this_cpu picks; up_to_avx2(): the same, the AVX2 clone where
// the AVX-512 one would run.  For kernels whose code is the same at every ISA, their loops
// vectorised by the compiler.
template <auto kFunction>
struct IsaClones;
template <typename R, typename... Args, R (*kFunction)(Args...)>
struct IsaClones<kFunction> {
  using Kernel = R (*)(Args...);
#ifdef FASTATTN_AVX512_CLONES
  FASTATTN_TARGET_AVX2 static R avx2(Args... args) { return kFunction(args...); }
  FASTATTN_TARGET_AVX512 static R avx512(Args... args) { return kFunction(args...); }
  static Kernel for_this_cpu() { return kernel_for_this_cpu<Kernel>(kFunction, &avx2, &avx512); }
  static Kernel up_to_avx2() { return kernel_for_this_cpu<Kernel>(kFunction, &avx2, &avx2); }
#else
  static Kernel for_this_cpu() { return kFunction; }
  static Kernel up_to_avx2() { return kFunction; }
#endif
};

// Whether the AVX512-BF16 clones run: the AVX-512 clones do and the CPU has AVX512-BF16
// (CPUID leaf 7, subleaf 1, EAX bit 5).  Decided once per process.
inline bool use_avx512_bf16_kernels() {
#ifdef FASTATTN_AVX512_BF16_CLONES
  static const bool use = [] {
    if (!use_avx512_kernels()) return false;
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) != 0 && (eax & (1u << 5)) != 0;
  }();
  return use;
#else
  return false;
#endif
}

// The engine of the LSTM/GRU layers' float32 GEMMs (their steps' tiles and their input
// projection, csrc/cpu/tile_gemm.h: layer_tile_engine): ATen's brgemm ukernel, or the
// BLAS's sgemm (MKL in torch's x86 wheels).  FASTATTN_CPU_LAYER_GEMM=blas or =brgemm
// chooses for every layer; unset, the BLAS for layers of large steps on Intel CPUs
// (kBlasForLargeSteps, where it was measured to win: see layer_tile_engine) and brgemm on
// the others (on the 2-core AMD EPYC (Zen 4) of this project's earlier sessions brgemm
// tiles ran 101 GFLOP/s a core at M=32, K=256, N=1024 against 85 for at::mm (MKL)).
// Decided once per process.
enum class LayerGemm { kBrgemm, kBlas, kBlasForLargeSteps };

inline LayerGemm layer_gemm_setting() {
  static const LayerGemm setting = [] {
    const char* value = std::getenv("FASTATTN_CPU_LAYER_GEMM");
    if (value != nullptr && value[0] != '\0') {
      if (std::strcmp(value, "blas") == 0) return LayerGemm::kBlas;
      if (std::strcmp(value, "brgemm") == 0) return LayerGemm::kBrgemm;
      throw std::invalid_argument(std::string("FASTATTN_CPU_LAYER_GEMM must be \"blas\" or \"brgemm\" (or unset), got \"") +
                                  value + "\"");
    }
#ifdef FASTATTN_AVX2_CLONES  // GCC or clang on x86: the __builtin_cpu_* queries
    __builtin_cpu_init();
    if (__builtin_cpu_is("intel")) return LayerGemm::kBlasForLargeSteps;
#endif
    return LayerGemm::kBrgemm;
  }();
  return setting;
}

}  // namespace fastattn
