// Run-time choice of the instruction set of the CPU kernels.  An extension meant for
// other machines is compiled without -march flags; its kernels are compiled twice
// instead, for the baseline ISA and with AVX2+FMA (a target attribute), and the AVX2
// clone is picked at run time when the CPU has it.  ATEN_CPU_CAPABILITY=default forces
// the baseline, as it does for ATen's own kernels.
#pragma once

#include <cstdlib>
#include <cstring>

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

}  // namespace fastattn
