// The Python module fastattn._C.  Loading it registers the ops (csrc/ops.cpp) and their
// kernels; the module itself only reports how it was built and which instruction sets its
// CPU kernels run with.  Plain pybind11, no torch headers, so this file compiles in seconds.
#include <pybind11/pybind11.h>

#include "cpu/isa.h"

#ifndef FASTATTN_CUDA_ARCH_LIST
#define FASTATTN_CUDA_ARCH_LIST ""
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
#ifdef FASTATTN_WITH_CUDA
  info["backends"] = pybind11::make_tuple("cpu", "cuda");
  info["cuda_arch_list"] = FASTATTN_CUDA_ARCH_LIST;
#else
  info["backends"] = pybind11::make_tuple("cpu");
  info["cuda_arch_list"] = pybind11::none();
#endif
  return info;
}

// The instruction sets the CPU kernels run with here, and the engine of the LSTM/GRU
// layers' float32 GEMMs, chosen at run time (csrc/cpu/isa.h).
pybind11::tuple cpu_kernels() {
  pybind11::list sets;
  sets.append(fastattn::use_avx512_kernels() ? "avx512" : fastattn::use_avx2_kernels() ? "avx2" : "baseline");
  if (fastattn::use_avx512_bf16_kernels()) sets.append("avx512_bf16");
  switch (fastattn::layer_gemm_setting()) {
    case fastattn::LayerGemm::kBrgemm: sets.append("layer_gemm_brgemm"); break;
    case fastattn::LayerGemm::kBlas: sets.append("layer_gemm_blas"); break;
    case fastattn::LayerGemm::kBlasForLargeSteps: sets.append("layer_gemm_blas_for_large_steps"); break;
  }
  return pybind11::tuple(sets);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastattn's compiled kernels; the ops are torch.ops.fastattn.*";
  m.def("build_info", &build_info, "How this extension was built: compiler, backends, CUDA archs");
  m.def("cpu_kernels", &cpu_kernels,
        "The instruction sets the CPU kernels run with here: avx512, avx2 or baseline, avx512_bf16 for the bfloat16 GEMMs, "
        "and the LSTM/GRU layers' float32 GEMMs: layer_gemm_brgemm, layer_gemm_blas or layer_gemm_blas_for_large_steps");
}
