"""Builds and installs fastattn.

``fastattn._C`` holds the C++ CPU kernels, and the CUDA kernels of ``csrc/cuda`` when the
installed torch has CUDA and ``nvcc`` is found (``TORCH_CUDA_ARCH_LIST`` picks the GPU
architectures, default ``8.0;9.0a``; ``fastattn.info()`` reports which were built).  Set
``FASTATTN_SKIP_EXTENSION=1`` to install without it: ``import fastattn`` then runs on the
reference backend and ``fastattn.info()`` says the extension is missing.  A failed
compile stops the install unless ``FASTATTN_EXTENSION_OPTIONAL=1``.

The Triton kernels live in the top-level ``kernels/`` folder of the repository and are
installed as ``fastattn.kernels``.
"""

import glob
import os
import shutil
import warnings

from setuptools import find_packages, setup

CPU_SOURCES = [
    "csrc/module.cpp", "csrc/ops.cpp", "csrc/autograd.cpp", "csrc/autocast.cpp", "csrc/decoder_step.cpp",
    "csrc/cpu/attention.cpp", "csrc/cpu/hard_attention_outputs.cpp", "csrc/cpu/recurrent.cpp",
]
CUDA_SOURCES = sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/cuda/binding.cpp"]
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0a"  # A100; H100/H200 (sm_90a)


def cuda_build_possible():
    """True when torch was built with CUDA and nvcc is on PATH or in CUDA_HOME."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return False
    nvcc = shutil.which("nvcc") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
    return nvcc is not None and os.path.exists(nvcc)


def cuda_extension(compile_args, link_args):
    """The CUDA build: the CPU sources plus csrc/cuda, for TORCH_CUDA_ARCH_LIST (default above)."""
    from torch.utils.cpp_extension import CUDAExtension

    arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    build_info = ["-DFASTATTN_WITH_CUDA", f'-DFASTATTN_CUDA_ARCH_LIST="{arch_list}"']
    return CUDAExtension(
        "fastattn._C",
        CPU_SOURCES + CUDA_SOURCES,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": compile_args + build_info, "nvcc": ["-O3", "-std=c++17"]},
        extra_link_args=link_args,
    )


def extension_build():
    """-> (ext_modules, cmdclass) for the setup() call."""
    if os.environ.get("FASTATTN_SKIP_EXTENSION") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as error:  # noqa: BLE001 - any compiler failure
                if os.environ.get("FASTATTN_EXTENSION_OPTIONAL") != "1":
                    raise
                warnings.warn(f"fastattn._C was not built ({error}); the reference backend will be used")

    # -fopenmp: ATen's at::parallel_for is inlined from its headers and is only
    # parallel where _OPENMP is defined; it links the libgomp torch already loads.
    compile_args, link_args = ["-O3", "-std=c++17", "-fopenmp"], ["-fopenmp"]
    if os.environ.get("FASTATTN_SANITIZE") == "1":  # csrc/sanitize_check.sh: AddressSanitizer and UBSan
        compile_args = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined"] + compile_args[1:]
        link_args = link_args + ["-fsanitize=address,undefined"]
    if cuda_build_possible():
        return [cuda_extension(compile_args, link_args)], {"build_ext": OptionalBuildExtension}
    extension = CppExtension(
        "fastattn._C",
        CPU_SOURCES,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": compile_args},
        extra_link_args=link_args,
    )
    return [extension], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = extension_build()
setup(
    packages=find_packages(include=["fastattn", "fastattn.*"]) + ["fastattn.kernels"],
    package_dir={"fastattn.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
